"""What a head fit is asked to do: `FitConfig` (task, head shape, manifest columns, splits) and the optimisation
settings inside it, `HeadTrainingConfig`. Plain dataclasses without torch, so the command line reads their
defaults (and maps its options onto their fields) without paying for an import."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEFAULT_K_SWEEP = (1, 3, 5, 10, 20)  # kNN heads: the k values fitting tries on the validation subjects


@dataclass(frozen=True)
class HeadTrainingConfig:
    """The optimisation loop of every torch head (`training.train_module`): AdamW, mini-batches, early stopping."""

    max_epochs: int = 200
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32  # training items per step (slices or subjects); 0 = the whole set
    patience: int = 30  # stop after this many epochs without a better validation loss
    seed: int = 0
    threads: int | None = 1  # torch threads while fitting: heads are small, one thread is fastest (threads.py)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitConfig:
    """A head fit on a manifest (see `fitting.fit_head`)."""

    task: str  # one of tasks.TASKS
    kind: str = ""  # segmentation: "linear" (default), "mlp" or "decoder"
    pooling: str = "mean"  # subject heads: "mean" or "attention"
    hidden: int = 256  # subject heads: MLP width (0: linear)
    layers: tuple[int, ...] | None = None  # segmentation: blocks to concatenate (None: the session's rule)
    image_columns: tuple[str, ...] = ()
    label_column: str = "label"
    target_column: str = "target"
    time_column: str = "time"
    event_column: str = "event"
    class_names: list[str] | None = None  # segmentation: names by label value
    val_fraction: float = 0.2
    folds: int = 0
    label_fraction: float = 1.0
    seed: int = 0
    k_values: tuple[int, ...] = DEFAULT_K_SWEEP
    training: HeadTrainingConfig = field(default_factory=HeadTrainingConfig)
