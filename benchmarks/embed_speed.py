"""Embedding speed on CPU: a naive slice loop versus `embed_volume`, in the same run.

Encoder: a ViT-S/16 with the DINOv3 architecture (random weights: speed does not depend on them), at
`--precision` (default fp32, so that the figure is the engine's batching and cropping alone; the precisions
are compared in cpu_inference.py).
Volume: the bundled Colin27 T1 (181 x 217 x 181, 1 mm).
- naive: every axial slice, batch 1, no crop (whole slice resized to 224);
- embed_volume: foreground slices only, cropped, batched (batch size from free memory), on CPU.
Prints slices/s of both, their ratio, and achieved GFLOP/s as a fraction of an fp32 matmul peak measured here.

    .venv/bin/python benchmarks/embed_speed.py [--precision fp32|int8] [--smoke]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from _common import TINY, VIT_S16, fixed_size, machine_line, matmul_gflops, random_checkpoint, read_resampled
from BrainDINOLib import embed_volume
from BrainDINOLib.atlas import COLIN27_T1
from BrainDINOLib.encoder import load_encoder
from BrainDINOLib.slices import foreground_mask, normalise_intensity


def flops_per_image(encoder, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        encoder.tokens(torch.zeros(1, encoder.architecture.in_chans, size, size))
    return counter.get_total_flops()


def naive_loop(volume, encoder, size: int) -> int:
    """Every slice, one at a time, whole slice resized to `size` (the obvious first implementation)."""
    normalised = torch.from_numpy(normalise_intensity(volume.array, foreground_mask(volume), (0.5, 99.5)))
    for k in range(normalised.shape[0]):
        image = F.interpolate(normalised[k][None, None], size=(size, size), mode="bilinear", align_corners=False)
        encoder.tokens(image.expand(-1, encoder.architecture.in_chans, -1, -1))
    return normalised.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", help="encoder precision (default fp32)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "braindino-bench")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny ViT at 32 px on Colin27 at 4 mm, one thread: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        torch.set_num_threads(1)
    architecture, size, spacing = (TINY, 32, 4.0) if args.smoke else (VIT_S16, 224, 1.0)
    checkpoint = random_checkpoint(architecture, args.work / f"embed-speed-{architecture.embed_dim}.safetensors")
    encoder = load_encoder(checkpoint, device="cpu", precision=args.precision)
    volume = read_resampled(COLIN27_T1, spacing)
    peak = matmul_gflops(torch.float32, 256 if args.smoke else 2048)
    flops = flops_per_image(encoder, size)
    print(f"{machine_line()}; fp32 matmul peak {peak:.1f} GFLOP/s")
    print(f"{architecture.describe()} at {size} px, {encoder.precision}: {flops / 1e9:.2f} GFLOP per slice")

    start = time.perf_counter()
    naive_slices = naive_loop(volume, encoder, size)
    naive_s = time.perf_counter() - start

    start = time.perf_counter()
    features = embed_volume(volume, encoder, policy=fixed_size(size))
    engine_s = time.perf_counter() - start

    runs = (("naive loop", naive_slices, naive_s), ("embed_volume", features.num_slices, engine_s))
    for name, slices, seconds in runs:
        achieved = slices * flops / seconds / 1e9
        print(f"{name:13s} {slices:4d} slices in {seconds:6.2f} s = {slices / seconds:6.2f} slices/s, "
              f"{achieved:6.1f} GFLOP/s = {achieved / peak:5.1%} of the fp32 matmul peak")
    print(f"volume time ratio naive / embed_volume: {naive_s / engine_s:.2f}x; "
          f"per-slice throughput ratio: {(features.num_slices / engine_s) / (naive_slices / naive_s):.2f}x")


if __name__ == "__main__":
    main()
