"""The pretraining loop, top to bottom: set up, (resume,) train step by step, checkpoint, export.

Exact resume: everything random in step s on rank r (the slices, the crops, the masks, drop-path) is
drawn from generators seeded by (seed, s, r), and the schedules are functions of s. So a checkpoint holds
only the networks, the optimizer, the teacher-target centres and the step; a run killed with SIGKILL
and resumed from its last checkpoint repeats exactly what the lost steps would have done.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..atomic import atomic_path, write_text_atomic
from ..distributed import Distributed, setup_distributed, teardown_distributed
from ..encoder import autocast_for
from ..errors import BrainDINOError, CancelledError
from ..slices import PreprocessConfig
from .batches import StepBatch, StepBatches, StepSlices, collate_single, derive_seed, synthetic_count
from .config import PretrainConfig, config_from_dict
from .export import export_teacher
from .losses import TeacherTargets, dino_loss, koleo_loss, cross_entropy
from .monitoring import MetricsLog, plot_loss_curves
from .model import DistillationNetwork, build_network
from .optim import Schedules, StepValues, apply_step_values, build_optimizer, update_teacher
from .shards import SliceShards
from .synthbrain import SyntheticBrains

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
CHECKPOINT_FORMAT = "braindino-pretrain/1"


@dataclass
class PretrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    seconds: float
    exported: dict[str, Path]


class Losses(torch.nn.Module):
    """The step's losses from student and teacher outputs; holds the teacher-target modules (and centres)."""

    def __init__(self, config: PretrainConfig):
        super().__init__()
        c = config.loss
        self.config = c
        self.dino_targets = TeacherTargets(c.prototypes, c.target, c.sinkhorn_iterations, c.center_momentum)
        self.ibot_targets = TeacherTargets(c.ibot_prototypes, c.target, c.sinkhorn_iterations, c.center_momentum)

    def forward(self, student, teacher, values: StepValues) -> dict[str, torch.Tensor]:
        c = self.config
        dino_targets = self.dino_targets(teacher.dino_global, values.teacher_temperature)
        ibot_targets = self.ibot_targets(teacher.ibot_masked, values.teacher_temperature)
        dino = dino_loss(dino_targets, student.dino_global, student.dino_local, c.student_temperature)
        ibot = cross_entropy(ibot_targets, student.ibot_masked, c.student_temperature)
        koleo = torch.stack([koleo_loss(view) for view in student.global_cls.chunk(2)]).mean()
        total = c.dino_weight * dino + c.ibot_weight * ibot + c.koleo_weight * koleo
        return {"loss": total, "dino": dino, "ibot": ibot, "koleo": koleo}


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (in name order): equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_step(student: torch.nn.Module, teacher: DistillationNetwork, losses: Losses,
                  optimizer: torch.optim.Optimizer, batch: StepBatch, values: StepValues,
                  clip_grad: float) -> dict[str, torch.Tensor]:
    """One optimisation step: student and teacher forward, losses, backward, clipping, AdamW, teacher EMA.

    `student` may be wrapped in DDP (which averages the gradients across processes during backward).
    Returns the losses (detached) and the gradient norm before clipping.
    """
    network = student.module if isinstance(student, DistributedDataParallel) else student
    with autocast_for(batch.global_crops.device):
        student_out = student(batch.global_crops, batch.local_crops, batch.masks)
        with torch.no_grad():
            teacher_out = teacher(batch.global_crops, None, batch.masks)
    terms = losses(student_out, teacher_out, values)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if values.freeze_prototypes:
        network.dino_head.prototypes.grad = None
        network.ibot_head.prototypes.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), clip_grad)
    optimizer.step()
    update_teacher(teacher, network, values.momentum)
    return {**{k: v.detach() for k, v in terms.items()}, "grad_norm": grad_norm.detach()}


def _save_checkpoint(path: Path, step: int, student: DistillationNetwork, teacher: DistillationNetwork,
                     optimizer: torch.optim.Optimizer, losses: Losses, config: PretrainConfig) -> None:
    state = {"format": CHECKPOINT_FORMAT, "step": step, "student_network": student.state_dict(),
             "teacher_network": teacher.state_dict(), "optimizer": optimizer.state_dict(),
             "losses": losses.state_dict(), "config": config.to_dict(),
             "architecture": student.architecture.to_dict()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, student: DistillationNetwork, teacher: DistillationNetwork,
                     optimizer: torch.optim.Optimizer, losses: Losses, config: PretrainConfig) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise BrainDINOError(path, f"not a BrainDINO pretraining checkpoint (format {state.get('format')!r})")
    saved = config_from_dict(state["config"])
    for section in ("crops", "model", "loss"):
        if getattr(saved, section) != getattr(config, section):
            log.warning("resuming with a different %s section than the checkpoint was trained with", section)
    student.load_state_dict(state["student_network"])
    teacher.load_state_dict(state["teacher_network"])
    optimizer.load_state_dict(state["optimizer"])
    losses.load_state_dict(state["losses"])
    return int(state["step"])


def _data_sources(config: PretrainConfig) -> tuple[SliceShards | None, SyntheticBrains | None, int, PreprocessConfig]:
    """The shards and the synthetic brains a config mixes (None when its weight is 0), how many of a step's
    slices are synthetic, and the preprocessing the slices share."""
    data, batch_size = config.data, config.optim.batch_size
    try:
        synthetic_slices = synthetic_count(batch_size, data.shards_weight, data.synthetic_weight)
    except ValueError as error:
        raise BrainDINOError("config", str(error)) from None
    shards = None
    if synthetic_slices < batch_size:
        if not data.shards:
            raise BrainDINOError("config", "data.shards is not set (a folder written by braindino prepare-slices)")
        shards = SliceShards(data.shards)
    preprocessing = shards.preprocessing if shards is not None else PreprocessConfig()
    image_size = shards.image_size if shards is not None else config.synthetic.image_size
    synthetic = SyntheticBrains(config.synthetic, image_size, preprocessing) if synthetic_slices else None
    return shards, synthetic, synthetic_slices, preprocessing


def pretrain(config: PretrainConfig, resume: bool = False, device: str | None = None,
             progress: Callable[[int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> PretrainResult:
    """Run (or resume) pretraining as described by `config`, in this process and its torchrun peers."""
    context = setup_distributed(device)
    try:
        return _pretrain(config, context, resume, progress, cancel)
    finally:
        teardown_distributed()


def _pretrain(config: PretrainConfig, context: Distributed, resume: bool,
              progress: Callable[[int, int], None] | None, cancel: Callable[[], bool] | None) -> PretrainResult:
    run, optim = config.run, config.optim
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    data = config.data
    shards, synthetic, synthetic_slices, preprocessing = _data_sources(config)
    output = Path(run.output_dir)
    if context.is_main:
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output / "config.yaml", config.to_yaml())

    # Networks: identical initialisation on every rank; the teacher starts as a copy and never gets gradients.
    torch.manual_seed(run.seed)
    student = build_network(config.model, config.loss).to(context.device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    architecture = student.architecture
    losses = Losses(config).to(context.device)
    optimizer = build_optimizer(student, architecture.depth, optim)
    schedules = Schedules(optim, config.loss, optim.batch_size * context.world_size)

    checkpoint_path = output / CHECKPOINT_NAME
    start = 0
    if resume and checkpoint_path.exists():
        start = _load_checkpoint(checkpoint_path, student, teacher, optimizer, losses, config)
        log.info("resumed from %s at step %d", checkpoint_path, start)
    elif resume:
        log.warning("no checkpoint in %s: starting from step 0", output)
    trainable = student
    if context.enabled:
        trainable = DistributedDataParallel(student, device_ids=[context.device.index]
                                            if context.device.type == "cuda" else None)

    # Crops are rendered on an accelerator when there is one (the workers only read or generate slices),
    # else in the loader (its workers, or this process when there are none).
    batches = StepBatches(shards, config.crops, config.loss, optim.batch_size, architecture.patch_size,
                          architecture.in_chans, run.seed, context.rank, context.world_size, synthetic=synthetic,
                          synthetic_slices=synthetic_slices, render_in_loader=context.device.type == "cpu")
    workers = {"prefetch_factor": data.prefetch_factor, "persistent_workers": True} if data.num_workers else {}
    loader = DataLoader(batches, batch_size=None, sampler=range(start, optim.steps), collate_fn=collate_single,
                        num_workers=data.num_workers, pin_memory=context.device.type == "cuda", **workers)
    metrics = MetricsLog(output, start) if context.is_main else None
    log.info("pretraining %s: steps %d..%d, %d process(es) x %d slices (%d synthetic, %d from %s shard slices)",
             architecture.describe(), start, optim.steps, context.world_size, optim.batch_size, synthetic_slices,
             optim.batch_size - synthetic_slices, len(shards) if shards is not None else 0)

    started = time.perf_counter()
    window_start, window_images, window_data = started, 0, 0.0
    values = {"loss": torch.tensor(float("nan"))}
    batches_in = iter(loader)
    for step in range(start, optim.steps):
        waited = time.perf_counter()
        batch = next(batches_in).to(context.device, non_blocking=True)
        if isinstance(batch, StepSlices):
            batch = batches.render(batch)
        window_data += time.perf_counter() - waited
        if cancel is not None and cancel():
            if context.is_main:
                _save_checkpoint(checkpoint_path, step, student, teacher, optimizer, losses, config)
            raise CancelledError(f"pretraining cancelled at step {step} (checkpoint saved)")
        step_values = schedules.at(step)
        apply_step_values(optimizer, step_values)
        torch.manual_seed(derive_seed(run.seed, step, context.rank, 3))  # drop-path draws

        values = training_step(trainable, teacher, losses, optimizer, batch, step_values, optim.clip_grad)
        window_images += optim.batch_size * context.world_size

        done = step + 1
        if metrics is not None and (done % run.log_every == 0 or done == optim.steps or step == start):
            now = time.perf_counter()
            row = {"step": step, "epoch": round(batches.epoch(done), 4),
                   **{k: round(float(values[k]), 6) for k in ("loss", "dino", "ibot", "koleo")},
                   "lr": step_values.lr, "weight_decay": round(step_values.weight_decay, 6),
                   "momentum": round(step_values.momentum, 6),
                   "teacher_temperature": round(step_values.teacher_temperature, 6),
                   "grad_norm": round(float(values["grad_norm"]), 4),
                   "images_per_s": round(window_images / max(now - window_start, 1e-9), 3),
                   "data_wait_fraction": round(window_data / max(now - window_start, 1e-9), 4),
                   "elapsed_s": round(now - started, 1)}
            metrics.add(row)
            log.info("step %d/%d loss %.4f (dino %.4f ibot %.4f koleo %.4f) lr %.2e %.1f img/s", done, optim.steps,
                     row["loss"], row["dino"], row["ibot"], row["koleo"], row["lr"], row["images_per_s"])
            window_start, window_images, window_data = now, 0, 0.0
        if done % run.checkpoint_every == 0 or done == optim.steps:
            if context.is_main:
                _save_checkpoint(checkpoint_path, done, student, teacher, optimizer, losses, config)
            context.barrier()
        if progress is not None:
            progress(done, optim.steps)

    seconds = time.perf_counter() - started
    final_loss = float(values["loss"])
    digests = context.gather(state_digest(teacher))
    exported: dict[str, Path] = {}
    if context.is_main:
        metrics.close()
        if metrics.rows:
            plot_loss_curves(metrics.path, output / "loss_curves.png", f"{architecture.describe()}")
        volumes = [v["path"] for v in shards.index["volumes"]] if shards is not None else []
        provenance = {"steps": optim.steps, "processes": context.world_size,
                      "slices": len(shards) if shards is not None else 0, "volumes": volumes,
                      "slice_size": shards.image_size if shards is not None else config.synthetic.image_size,
                      "synthetic_slices_per_step": synthetic_slices, "config": config.to_dict(),
                      "final_loss": final_loss}
        exported = export_teacher(teacher, output / "export", run.export_name, preprocessing, provenance,
                                  description=f"BrainDINO pretraining run in {output}", iteration=optim.steps)
        summary = {"steps": optim.steps, "resumed_from": start, "final_loss": final_loss,
                   "seconds_this_run": round(seconds, 1), "world_size": context.world_size,
                   "teacher_digests": digests, "exported": {k: str(v) for k, v in exported.items()}}
        write_text_atomic(output / "final.json", json.dumps(summary, indent=1) + "\n")
        log.info("finished %d steps, final loss %.4f, %.0f s; exported %s", optim.steps, final_loss, seconds,
                 ", ".join(map(str, exported.values())))
    context.barrier()
    return PretrainResult(output, optim.steps, final_loss, seconds, exported)
