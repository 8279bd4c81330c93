"""One check for the day a CUDA GPU is lent: embedding speed and fidelity, FLOP utilisation, memory per volume,
pretraining steps and the demo end to end, printed as one table (and written as JSON). A few minutes on one GPU.

Checks, in order (each row of the table names its check):
- throughput: ViT-S/16 and ViT-B/16 (the released architecture, random weights) at 224 px and at `--fine` px
  (768: about 4 mm patches over a 200 mm field of view), `Encoder.tokens` with the blocks heads read, at the
  device's default precision and at fp32: slices/s at a large batch, and model FLOP utilisation (FLOPs counted
  by torch's FlopCounterMode) against the GPU's dense bf16 peak (the table below, or `--peak-tflops`).
  Aim: >= 50 % for ViT-B at a large batch.
- fidelity: the default precision against fp32 on real Colin27 slices (ViT-S, ViT-B with LayerScale drawn from
  [0.1, 1] so that every block matters, and the bundled demo model): mean and 1st percentile of the per-patch
  cosine similarity of the final tokens, and the lowest mean over the blocks heads read. Aim: mean >= 0.99.
- volume: `embed_volume` of the bundled Colin27 T1 with ViT-B at both sizes: seconds, slices/s, and the peak
  device memory it allocated.
- pretraining: a few steps of the demo recipe (Training/configs/demo.yaml) and of a ViT-B/16 recipe (the demo
  recipe at DINOv2's ViT-B sizes: 224/96 px crops, 8 local crops, 65536 prototypes, batch 64, 8 loader workers)
  on shards of the bundled volumes: steps/s (after two warm-up steps) and the share of time the loop waited for
  data (the trainer's `data_wait_fraction` column).
- demo: wall-clock seconds of `braindino demo --device cuda` in a fresh process.

    .venv/bin/python benchmarks/device_check.py [--json device_check.json] [--peak-tflops T] [--fine 768]
    .venv/bin/python benchmarks/device_check.py --smoke     # tiny sizes, on the CPU if there is no GPU
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import (TINY, VIT_B16, VIT_S16, colin27_slices, fixed_size, machine_line, matmul_gflops, patch_cosine,
                     random_checkpoint, write_json)
from BrainDINOLib import embed_volume, read_volume
from BrainDINOLib.atlas import COLIN27_T1, MNI152_T1
from BrainDINOLib.checkpoints import load_backbone, read_checkpoint
from BrainDINOLib.session import segmentation_layers
from BrainDINOLib.encoder import Encoder, autocast_for
from BrainDINOLib.threads import torch_threads

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "Training" / "configs" / "demo.yaml"

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), from the vendors' data sheets; the first name that is
# part of torch.cuda.get_device_name() wins, so the more specific names come first.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "H800": 989, "GH200": 989,
                    "B200": 2250, "A100": 312, "A800": 312, "L40S": 362, "L40": 181, "L4": 121, "A10G": 70,
                    "A10": 125, "A6000": 155, "RTX 6000 Ada": 365, "4090": 165, "3090": 71}

VIT_B_RECIPE = ("model.embed_dim=768", "model.depth=12", "model.num_heads=12", "crops.global_size=224",
                "crops.local_size=96", "crops.local_count=8", "loss.head_hidden_dim=2048",
                "loss.head_bottleneck_dim=256", "loss.prototypes=65536", "loss.ibot_prototypes=65536",
                "optim.batch_size=64", "data.num_workers=8", "run.num_threads=0")
SMOKE_RECIPE = ("model.embed_dim=64", "model.depth=2", "model.num_heads=1", "crops.global_size=64",
                "crops.local_size=32", "crops.local_count=2", "loss.head_hidden_dim=64",
                "loss.head_bottleneck_dim=32", "loss.prototypes=128", "loss.ibot_prototypes=128",
                "optim.batch_size=2", "data.num_workers=0")


@dataclass
class Row:
    check: str
    setting: str
    result: str
    figures: dict = field(default_factory=dict)


def bf16_peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The peak to measure utilisation against, and where it came from."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return matmul_gflops(torch.float32, 512) / 1e3, "measured fp32 matmul (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return float(peak), f"{name} data sheet"
    return None, f"{name}: unknown (give --peak-tflops)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slices_per_second(encoder: Encoder, images: torch.Tensor, layers: tuple[int, ...], seconds: float) -> float:
    """Steady-state slices/s of `encoder.tokens` on one batch, timed for about `seconds` after two warm-ups."""
    for _ in range(2):
        encoder.tokens(images, layers)
    synchronize(encoder.device)
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < seconds:
        encoder.tokens(images, layers)
        calls += 1
        synchronize(encoder.device)  # every call: the loop condition reads the clock
    return calls * len(images) / (time.perf_counter() - start)


def flops_per_slice(encoder: Encoder, size: int, layers: tuple[int, ...]) -> float:
    """FLOPs of one slice through an fp32 encoder (matmuls and attention, as torch's FlopCounterMode counts)."""
    counter = FlopCounterMode(display=False)
    with counter:
        encoder.tokens(torch.zeros(1, encoder.architecture.in_chans, size, size, device=encoder.device), layers)
    return counter.get_total_flops()


def encoders_at(source: str | Path, device: torch.device) -> dict[str, Encoder]:
    """The checkpoint as an `Encoder` at the device's default precision ("auto") and at fp32, sharing weights."""
    checkpoint = read_checkpoint(source)
    model = load_backbone(checkpoint)
    return {name: Encoder(model, checkpoint, device, precision=name) for name in ("auto", "fp32")}


def throughput_rows(name: str, encoders: dict[str, Encoder], sizes: dict[int, int], peak: float | None,
                    seconds: float) -> list[Row]:
    rows = []
    reference = encoders["fp32"]
    layers = segmentation_layers(reference.architecture.depth)
    for size, batch in sizes.items():
        flops = flops_per_slice(reference, size, layers)
        images = torch.randn(batch, reference.architecture.in_chans, size, size, device=reference.device)
        for encoder in encoders.values():
            rate = slices_per_second(encoder, images, layers, seconds)
            utilisation = flops * rate / (peak * 1e12) if peak else None
            result = f"{rate:8.1f} slices/s" + (f", {utilisation:5.1%} of bf16 peak" if utilisation is not None else "")
            rows.append(Row("throughput", f"{name} {size} px batch {batch} {encoder.precision}", result,
                            {"slices_per_s": rate, "mfu": utilisation, "gflop_per_slice": flops / 1e9}))
            print(f"  {rows[-1].setting}: {result}", flush=True)
    return rows


def fidelity_rows(name: str, encoders: dict[str, Encoder], sizes: list[int], count: int) -> list[Row]:
    rows = []
    reference_encoder = encoders["fp32"]
    layers = segmentation_layers(reference_encoder.architecture.depth)
    for size in sizes:
        images = colin27_slices(reference_encoder, size, count)
        with autocast_for(reference_encoder.device):  # as embed_volume calls it: fp32 must stay fp32 inside
            reference = reference_encoder.tokens(images, layers)
            tokens = encoders["auto"].tokens(images, layers)
        if reference.patches.dtype != torch.float32:
            raise RuntimeError(f"the fp32 encoder returned {reference.patches.dtype} inside the engine's autocast")
        final = patch_cosine(tokens.patches.cpu(), reference.patches.cpu())
        lowest_block = min(patch_cosine(tokens.layers[i].cpu(), reference.layers[i].cpu())[0] for i in layers)
        verdict = "ok" if min(final[0], lowest_block) >= 0.99 else "BELOW 0.99"
        result = f"cosine mean {final[0]:.4f}, p1 {final[1]:.4f}, blocks {lowest_block:.4f} ({verdict})"
        rows.append(Row("fidelity", f"{name} {size} px {encoders['auto'].precision} vs fp32", result,
                        {"cosine_mean": final[0], "cosine_p1": final[1], "cosine_blocks_min": lowest_block}))
        print(f"  {rows[-1].setting}: {result}", flush=True)
    return rows


def volume_rows(name: str, encoder: Encoder, sizes: list[int]) -> list[Row]:
    rows = []
    volume = read_volume(COLIN27_T1)
    layers = segmentation_layers(encoder.architecture.depth)
    for size in sizes:
        if encoder.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(encoder.device)
            before = torch.cuda.memory_allocated(encoder.device)
        start = time.perf_counter()
        features = embed_volume(volume, encoder, policy=fixed_size(size), layers=layers)
        synchronize(encoder.device)
        seconds = time.perf_counter() - start
        memory = (torch.cuda.max_memory_allocated(encoder.device) - before) / 2**30 \
            if encoder.device.type == "cuda" else None
        result = (f"{seconds:6.1f} s for {features.num_slices} slices = {features.num_slices / seconds:6.1f} slices/s"
                  + (f", peak {memory:.2f} GiB" if memory is not None else ""))
        rows.append(Row("volume", f"{name} Colin27 {size} px {encoder.precision} blocks {list(layers)}", result,
                        {"seconds": seconds, "slices": features.num_slices, "peak_gib": memory}))
        print(f"  {rows[-1].setting}: {result}", flush=True)
    return rows


def pretraining_row(name: str, overrides: tuple[str, ...], shards: Path, output: Path, steps: int,
                    device: torch.device) -> Row:
    """`steps` pretraining steps in this process; steps/s after two warm-up steps, before the last (which
    writes the checkpoint), and the mean data-wait share the trainer logged after the first step."""
    from BrainDINOLib.training import pretrain
    from BrainDINOLib.training.config import load_config

    config = load_config(DEMO_RECIPE, [*overrides, f"data.shards={shards}", f"run.output_dir={output}",
                                       f"optim.steps={steps}", "run.log_every=1", f"run.checkpoint_every={steps}"])
    finished: dict[int, float] = {}
    with torch_threads(torch.get_num_threads()):  # a recipe may set the thread count: restore it afterwards
        pretrain(config, device=str(device),
                 progress=lambda done, total: finished.setdefault(done, time.perf_counter()))
    rate = (steps - 3) / (finished[steps - 1] - finished[2])
    with open(output / "metrics.csv", newline="") as handle:
        waits = [float(row["data_wait_fraction"]) for row in csv.DictReader(handle)][1:]
    batch = config.optim.batch_size
    result = f"{rate:6.2f} steps/s = {rate * batch:7.1f} slices/s, data wait {np.mean(waits):5.1%}"
    print(f"  {name}: {result}", flush=True)
    return Row("pretraining", f"{name}: {config.model.embed_dim}x{config.model.depth}, batch {batch}, "
                              f"{config.data.num_workers} workers", result,
               {"steps_per_s": rate, "batch": batch, "data_wait_fraction": float(np.mean(waits))})


def demo_row(device: torch.device, output: Path, smoke: bool) -> Row:
    command = [sys.executable, "-m", "BrainDINOLib.cli", "demo", "--device", device.type, "--out", str(output),
               "--no-cache", *(["--image-size", "32", "--clusters", "2", "--labelled-slices", "2"] if smoke else [])]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"} if smoke else None
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    dice = next((line for line in result.stdout.splitlines() if "Dice" in line), "")
    text = f"{seconds:6.1f} s end to end; {dice.strip()}"
    print(f"  braindino demo --device {device.type}: {text}", flush=True)
    return Row("demo", f"braindino demo --device {device.type}", text, {"seconds": seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda (required unless --smoke)")
    parser.add_argument("--fine", type=int, default=768, help="the fine input size in px (default 768)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of this GPU, if not in the table")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per throughput figure")
    parser.add_argument("--steps", type=int, default=12, help="pretraining steps per recipe")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "braindino-device-check")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks that the script runs")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be at least 4 (two warm-up steps, one timed, one that writes the checkpoint)")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        parser.error(f"this check is for a CUDA GPU and the device is {device.type}; add --smoke to check the "
                     "script itself on this device")

    if args.smoke:
        torch.set_num_threads(1)
        models, sizes = {"tiny": TINY}, {32: 2}
        recipes = {"demo recipe (shrunk)": SMOKE_RECIPE, "ViT-B recipe (shrunk)": VIT_B_RECIPE + SMOKE_RECIPE}
        args.seconds, args.steps, shard_size = 0.2, 4, 64
    else:
        models, sizes = {"ViT-S/16": VIT_S16, "ViT-B/16": VIT_B16}, {224: 256, args.fine: 32}
        recipes = {"demo recipe": (), "ViT-B/16 recipe": VIT_B_RECIPE}
        shard_size = 224
    peak, peak_source = bf16_peak_tflops(device, args.peak_tflops)
    print(machine_line())
    print(f"device {device}: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; "
          f"peak {f'{peak:.3g} TFLOP/s' if peak else 'unknown'} ({peak_source})", flush=True)

    rows: list[Row] = []
    encoders = {name: encoders_at(random_checkpoint(arch, args.work / f"{name.replace('/', '')}.safetensors"), device)
                for name, arch in models.items()}
    for name, pair in encoders.items():
        rows += throughput_rows(name, pair, sizes, peak, args.seconds)
    for name, pair in {**encoders, "demo": encoders_at("demo", device)}.items():
        rows += fidelity_rows(name, pair, list(sizes), count=4 if args.smoke else 8)
    largest = list(encoders)[-1]
    rows += volume_rows(largest, encoders[largest]["auto"], list(sizes))

    from BrainDINOLib.training import prepare_slices

    shards = args.work / f"shards-{shard_size}"
    if not (shards / "index.json").exists():
        prepare_slices([COLIN27_T1, MNI152_T1], shards, image_size=shard_size)
    for number, (name, overrides) in enumerate(recipes.items()):
        rows.append(pretraining_row(name, overrides, shards, args.work / f"pretrain-{number}", args.steps, device))
    rows.append(demo_row(device, args.work / "demo-output", args.smoke))

    print(f"\n{'check':12s} {'setting':58s} result")
    for row in rows:
        print(f"{row.check:12s} {row.setting:58s} {row.result}")
    write_json(args.json, {"machine": machine_line(), "device": str(device), "peak_tflops": peak,
                           "peak_source": peak_source, "rows": [asdict(row) for row in rows]})


if __name__ == "__main__":
    main()
