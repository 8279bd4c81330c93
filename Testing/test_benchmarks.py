"""Every script in benchmarks/ runs in its smoke mode and prints figures, so none can rot unnoticed.

The scripts are found by glob (files starting with "_" are shared helpers), so a new benchmark is covered
the day it is added; the contract is a `--smoke` option (tiny models and sizes, seconds: it checks that the
code runs, not its speed) and scratch files under `tempfile.gettempdir()`.
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

BENCHMARKS = sorted(path for path in (REPO / "benchmarks").glob("*.py") if not path.name.startswith("_"))
FIGURE = re.compile(r"\d+(\.\d+)?\s*(s|ms|x|%|GFLOP/s|slices/s|steps/s)\b")
PHRASES = {"cohort": ("volumes/min", "resume", "8-GPU node"),  # what each script's report must name
           "pretrain_data": ("crops/s", "CPU cores", "data")}


def test_benchmarks_are_found():
    assert {"cpu_inference.py", "device_check.py", "embed_speed.py"} <= {path.name for path in BENCHMARKS}


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.stem)
def test_benchmark_smoke_mode_runs_and_prints_figures(script, tmp_path):
    environment = {**os.environ, "TMPDIR": str(tmp_path)}  # the scripts' scratch files stay in this test
    result = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = [line for line in result.stdout.splitlines() if FIGURE.search(line)]
    assert len(figures) >= 3, result.stdout
    assert all(phrase in result.stdout for phrase in PHRASES.get(script.stem, ())), result.stdout
