"""Whole pretraining runs of the micro model on real slices: two gloo processes under torchrun, SIGKILL and
resume (with synthetic brains mixed into every step) against an uninterrupted run, and the exported teacher read
back by the engine."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_helpers import (MICRO_CONFIG, PRETRAIN, environment, micro_shards, pretrain_command,
                              single_thread)  # noqa: F401

from BrainDINOLib import load_encoder
from BrainDINOLib.training import load_config, pretrain
from BrainDINOLib.training.trainer import CHECKPOINT_NAME, state_digest
from BrainDINOLib.training.model import build_network

STEPS = 12
MIXED = ["data.synthetic_weight=1.0", "synthetic.spacing_mm=2.0"]  # half of every step synthetic, coarse label maps


def _tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, by dotted path."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_tensors(value, f"{name}."))
        elif isinstance(value, list):
            out.update(_tensors(dict(enumerate(value)), f"{name}."))
    return out


def tensorboard_losses(run: Path) -> list[tuple[int, float]]:
    """(step, total loss) as TensorBoard reads the run's event files (after any resume purge)."""
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("loss")]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    shards = micro_shards(tmp_path_factory)
    output = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(PRETRAIN),
               *pretrain_command(shards, output, steps=3)[2:]]
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_two_gloo_processes_train_and_agree_on_the_checkpoint(two_process_run):
    summary = json.loads((two_process_run / "final.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    digests = summary["teacher_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    state = torch.load(two_process_run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert state["step"] == 3
    config = load_config(MICRO_CONFIG)
    teacher = build_network(config.model, config.loss)
    teacher.load_state_dict(state["teacher_network"])
    assert state_digest(teacher) == digests[0]
    with open(two_process_run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 1, 2] and all(float(r["loss"]) > 0 for r in rows)
    assert tensorboard_losses(two_process_run) == [(int(r["step"]), pytest.approx(float(r["loss"]))) for r in rows]
    assert (two_process_run / "loss_curves.png").stat().st_size > 10_000


def test_exported_teacher_round_trips_through_load_encoder(two_process_run):
    state = torch.load(two_process_run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    config = load_config(MICRO_CONFIG)
    teacher = build_network(config.model, config.loss).eval()
    teacher.load_state_dict(state["teacher_network"])
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        reference = teacher.backbone.forward_features(images)
    export = two_process_run / "export"
    for path, tolerance in ((export / "teacher_checkpoint.pth", 1e-5), (export / "micro.safetensors", 2e-2)):
        encoder = load_encoder(path, device="cpu", precision="fp32")
        assert encoder.architecture == teacher.architecture
        tokens = encoder.tokens(images)
        torch.testing.assert_close(tokens.cls, reference[:, 0], atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(tokens.patches.flatten(1, 2), reference[:, 5:], atol=tolerance, rtol=tolerance)
    card = load_encoder(export / "micro.safetensors", device="cpu").card
    assert card.provenance["slice_size"] == 64 and card.provenance["steps"] == 3
    raw = torch.load(export / "teacher_checkpoint.pth", map_location="cpu", weights_only=True)
    assert raw["iteration"] == 3 and "dino_head.prototypes" in raw["teacher"] and "ibot_head.mlp.0.weight" in raw["teacher"]


def test_a_run_killed_with_sigkill_and_resumed_equals_an_uninterrupted_run(tmp_path, tmp_path_factory):
    shards = micro_shards(tmp_path_factory)
    killed = tmp_path / "killed"
    mixed = [argument for override in MIXED for argument in ("--set", override)]
    process = subprocess.Popen(pretrain_command(shards, killed, *mixed, steps=STEPS), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (killed / CHECKPOINT_NAME).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "final.json").exists(), "the run finished before it could be killed"
    stopped_at = torch.load(killed / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["step"]
    assert 0 < stopped_at < STEPS
    # TensorBoard orders event files by their creation second, then by process id: a resume within the same
    # second as the killed run's start (only a test is that fast) would be read before it.
    time.sleep(1.1)

    overrides = [f"data.shards={shards}", f"optim.steps={STEPS}", *MIXED]
    pretrain(load_config(MICRO_CONFIG, overrides + [f"run.output_dir={killed}"]), resume=True, device="cpu")
    uninterrupted = tmp_path / "uninterrupted"
    pretrain(load_config(MICRO_CONFIG, overrides + [f"run.output_dir={uninterrupted}"]), device="cpu")

    resumed_state = torch.load(killed / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    reference_state = torch.load(uninterrupted / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert json.loads((killed / "final.json").read_text())["resumed_from"] == stopped_at
    resumed, reference = _tensors(resumed_state), _tensors(reference_state)
    assert resumed.keys() == reference.keys() and len(resumed) > 100
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)
    with open(killed / "metrics.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == list(range(STEPS))
    # TensorBoard too reads as one run: the killed run's steps after its checkpoint are purged on resume.
    assert [step for step, _ in tensorboard_losses(killed)] == list(range(STEPS))
