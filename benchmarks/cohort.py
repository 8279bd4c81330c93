"""Cohort embedding on CPU: a shell loop of `braindino embed` against `braindino embed-cohort` with 1 and 2
(gloo) processes, in volumes per minute, and the cost of resuming a run killed (SIGKILL, every process) halfway.

Cases: `make-cases tissue` (2 mm, one T1 each), embedded with the same model and resolution by every variant, one
run each, in the order loop, 1 process, 2 processes, kill + resume (the machine is shared: read the ratios, not the
seconds). The loop writes each volume's features with `--out` and no cache, as a user scripting `embed` would;
embed-cohort writes a store. Last, the estimate for 10,000 subjects on one 8-GPU node, from the FLOPs of a
ViT-B/16 on the bundled Colin27 T1 at the CUDA resolution and an ASSUMED GPU rate (no GPU measurement exists yet).

    .venv/bin/python benchmarks/cohort.py [--cases 24] [--model demo] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "dinov3_teacher" / "teacher_checkpoint.pth"
GPU_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the vendor's figure
ASSUMED_UTILISATION = 0.4  # of that peak, for ViT-B at large batch (issue 13 aims at >= 50 %)
SUBJECTS, GPUS = 10_000, 8


def cli(*words: str) -> list[str]:
    return [sys.executable, "-m", "BrainDINOLib.cli", *words]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=environment(), capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - started


def finished(store: Path) -> int:
    """Volumes recorded in the journals of a run in progress."""
    return sum(path.read_bytes().count(b"\n") for path in (store / "journal").glob("rank-*.jsonl"))


def kill_halfway(command: list[str], store: Path, volumes: int) -> int | None:
    """Run `command`, SIGKILL all its processes once half the volumes are recorded; how many were (None if the run
    ended first, as a tiny smoke run may)."""
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    while process.poll() is None and finished(store) < volumes // 2:
        time.sleep(0.05)
    if process.poll() is not None:
        return None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return finished(store)


def mean_read_seconds(store: Path) -> float:
    """Seconds a DataLoader worker spent reading and preprocessing a volume, on average over a store's volumes."""
    volumes = json.loads((store / "index.json").read_text())["volumes"]
    return sum(v["read_seconds"] for v in volumes) / len(volumes)


def gpu_estimate(read_seconds: float) -> str:
    """10,000 subjects on one 8-GPU node: ViT-B/16 FLOPs of Colin27 at the CUDA resolution at an ASSUMED GPU rate,
    and the CPU cores reading must then keep busy (`read_seconds` per volume, measured here)."""
    from BrainDINOLib.atlas import COLIN27_T1
    from BrainDINOLib.resolution import DEFAULTS
    from BrainDINOLib.slices import PreprocessConfig, SliceStack
    from BrainDINOLib.volume import read_volume

    stack = SliceStack.from_volume(read_volume(COLIN27_T1), 16, PreprocessConfig(), DEFAULTS["cuda"])
    h, w = stack.geometry.grid
    tokens, dim, depth = h * w + 1, 768, 12
    per_slice = depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim)  # qkv, projection, MLP 4x, attention
    seconds = len(stack) * per_slice / (GPU_BF16_TFLOPS * 1e12 * ASSUMED_UTILISATION)
    hours = SUBJECTS * seconds / GPUS / 3600
    return (f"8-GPU node, ASSUMED GPU rate (no GPU measurement exists yet): ViT-B/16 on Colin27 at "
            f"{DEFAULTS['cuda'].describe()} is {len(stack)} slices x {h}x{w} patches = "
            f"{len(stack) * per_slice / 1e12:.1f} TFLOP; at {ASSUMED_UTILISATION:.0%} of {GPU_BF16_TFLOPS:g} TFLOP/s "
            f"that is {seconds:.2f} s per volume per GPU, so {SUBJECTS} subjects take about {hours:.2f} h on {GPUS} "
            f"GPUs if reading keeps up: {GPUS / seconds:.0f} volumes/s, which at the {read_seconds:.2f} s of reading "
            f"and preprocessing per volume measured here needs about {GPUS / seconds * read_seconds:.0f} CPU cores "
            f"(else reading bounds it: {SUBJECTS * read_seconds / 3600:.1f} core-hours)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--smoke", action="store_true",
                        help="2 small cases, the test fixture's tiny model at 64 px: checks that it runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="braindino-cohort-bench-") as folder:
        run_benchmark(Path(folder), args)


def run_benchmark(root: Path, args: argparse.Namespace) -> None:
    """Every variant on generated cases under `root`."""
    from BrainDINOLib.synthetic import CaseConfig, make_cases

    cases, config, model = args.cases, CaseConfig(), ["--model", args.model]
    if args.smoke:
        cases, config, model = 2, replace(CaseConfig(), spacing_mm=6.0), ["--model", str(FIXTURE), "--image-size",
                                                                          "64"]
    options = [*model, "--device", "cpu"]
    manifest = make_cases("tissue", root / "cases", cases, 0, seed=5, config=config)
    volumes = sorted((root / "cases").glob("*_T1.nii.gz"))
    name = "the test fixture at 64 px" if args.smoke else args.model
    print(f"{len(volumes)} tissue cases at {config.spacing_mm:g} mm, model {name}, {os.cpu_count()} cores; one run each")

    loop = sum(timed(cli("embed", str(v), "--out", str(root / f"loop-{n}.safetensors"), "--no-cache", *options))
               for n, v in enumerate(volumes))
    rates = {"shell loop of braindino embed": loop}
    for processes in (1, 2):
        store = root / f"store-{processes}"
        rates[f"embed-cohort, {processes} process(es)"] = timed(
            cli("embed-cohort", str(manifest), "--out", str(store), "--nproc-per-node", str(processes), *options))
    for name, seconds in rates.items():
        print(f"{name:34s} {seconds:7.1f} s = {60 * len(volumes) / seconds:6.1f} volumes/min "
              f"({loop / seconds:4.1f}x the loop)")

    store = root / "store-killed"
    command = cli("embed-cohort", str(manifest), "--out", str(store), "--nproc-per-node", "2", *options)
    done = kill_halfway(command, store, len(volumes))
    resume = timed(command)
    same = json.loads((store / "index.json").read_text())["entries"] == \
        json.loads((root / "store-2" / "index.json").read_text())["entries"]
    if done is None:
        print(f"resume: the run ended before the kill (too small a cohort); running it again took {resume:.1f} s; "
              f"index entries as uninterrupted: {same}")
    else:
        share = (len(volumes) - done) / len(volumes) * rates["embed-cohort, 2 process(es)"]
        print(f"resume after SIGKILL of every process with {done}/{len(volumes)} volumes recorded: {resume:.1f} s for "
              f"the other {len(volumes) - done}, against {share:.1f} s for that share of an uninterrupted run "
              f"(resume overhead {resume - share:+.1f} s); index entries as uninterrupted: {same}")
    print(gpu_estimate(mean_read_seconds(root / "store-1")))

if __name__ == "__main__":
    main()
