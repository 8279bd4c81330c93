"""Monitoring a pretraining run: a CSV log (one row per logged step), TensorBoard when installed, a loss-curve PNG."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from ..atomic import atomic_path

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends rows to `metrics.csv`. On resume, rows from steps at or after the resume step (logged by the
    killed run after its last checkpoint) are dropped, so the log reads as one uninterrupted run."""

    def __init__(self, output_dir: Path, resume_step: int = 0):
        self.path = output_dir / "metrics.csv"
        self.rows: list[dict] = []
        if resume_step and self.path.exists():
            with open(self.path, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["step"]) < resume_step]
        self._write()
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step or None)
        except ImportError:
            log.info("tensorboard is not installed: metrics go to %s only", self.path)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, float(value), int(row["step"]))
            # Flushed row by row, as the CSV is: a killed run would otherwise lose its buffered events.
            self.tensorboard.flush()

    def _write(self) -> None:
        if not self.rows:
            return
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_loss_curves(csv_path: Path, png_path: Path, title: str = "pretraining losses") -> Path:
    """Total, DINO, iBOT and KoLeo losses against the step, and the lr, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows]
    figure, (losses, rates) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for key in ("loss", "dino", "ibot", "koleo"):
        losses.plot(steps, [float(r[key]) for r in rows], label=key, linewidth=1.5 if key == "loss" else 1)
    losses.set_ylabel("loss")
    losses.legend()
    losses.grid(alpha=0.3)
    losses.set_title(title)
    rates.plot(steps, [float(r["lr"]) for r in rows], color="grey")
    rates.set_ylabel("lr")
    rates.set_xlabel("step")
    rates.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return png_path
