"""Shared fixtures: paths to the real data in ../shared and the bundled sample, small encoders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from BrainDINOLib.atlas import COLIN27_T1

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the tests in parallel workers (pytest -n auto), one per core: each worker and the processes
    # its tests start compute on one thread, so the workers share the cores instead of oversubscribing them.
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"
TEACHER_FIXTURE = FIXTURES / "dinov3_teacher"
SAMPLE_T1 = COLIN27_T1  # the bundled sample volume


def reference_checkpoints() -> dict[str, Path]:
    """Every reference fixture folder (one with an expected.pt) and the one checkpoint file in it."""
    return {folder.name: next(folder.glob("*.pth")) for folder in sorted(FIXTURES.iterdir())
            if (folder / "expected.pt").exists()}


@pytest.fixture(scope="session")
def teacher_checkpoint() -> Path:
    return TEACHER_FIXTURE / "teacher_checkpoint.pth"


@pytest.fixture(scope="session")
def sample_volume():
    from BrainDINOLib import read_volume
    return read_volume(SAMPLE_T1)


@pytest.fixture(scope="session")
def fixture_encoder(teacher_checkpoint):
    from BrainDINOLib import load_encoder
    return load_encoder(teacher_checkpoint, device="cpu", precision="fp32")  # compared with reference outputs
