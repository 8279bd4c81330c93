"""Shared pieces of the training tests: micro shards from real MRI, and launching Training/pretrain.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from BrainDINOLib.threads import torch_threads
from volume_factories import downsampled

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "Training" / "pretrain.py"
MICRO_CONFIG = REPO / "Training" / "configs" / "micro.yaml"
COLIN_BRAIN = REPO.parent / "shared" / "data" / "colin27" / "ch2bet.nii.gz"
MNI_T1 = REPO.parent / "shared" / "data" / "mni152_2009a" / "t1.nii.gz"


def pretrain_command(shards: Path, output: Path, *extra: str, steps: int = 6) -> list[str]:
    return [sys.executable, str(PRETRAIN), "--config", str(MICRO_CONFIG), "--device", "cpu",
            "--set", f"data.shards={shards}", "--set", f"run.output_dir={output}",
            "--set", f"optim.steps={steps}", *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_pretrain(shards: Path, output: Path, *extra: str, steps: int = 6) -> subprocess.CompletedProcess:
    result = subprocess.run(pretrain_command(shards, output, *extra, steps=steps), env=environment(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


_CACHE: dict[str, Path] = {}


def two_mm_brain(tmp_path_factory) -> Path:
    """The real Colin27 brain (skull-stripped) resampled to 2 mm: small enough for quick tests."""
    if "brain" not in _CACHE:
        path = tmp_path_factory.mktemp("volumes") / "colin27_brain_2mm.nii.gz"
        sitk.WriteImage(downsampled(COLIN_BRAIN, 2.0, pixel=sitk.sitkFloat32), str(path))
        _CACHE["brain"] = path
    return _CACHE["brain"]


def micro_shards(tmp_path_factory) -> Path:
    """Shards of the 2 mm Colin27 brain at 64 px, prepared once per test session."""
    if "shards" not in _CACHE:
        from BrainDINOLib.training import prepare_slices

        root = tmp_path_factory.mktemp("micro_shards")
        prepare_slices([two_mm_brain(tmp_path_factory)], root, image_size=64, shard_size=32)
        _CACHE["shards"] = root
    return _CACHE["shards"]


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread per test: the machine's cores are shared, and oversubscription is very slow."""
    with torch_threads(1):
        yield
