"""Embedding speed on CPU: a naive slice loop versus `embed_volume`, in the same run.

Encoder: a ViT-S/16 with the DINOv3 architecture (random weights: speed does not depend on them).
Volume: the bundled Colin27 T1 (181 x 217 x 181, 1 mm).
- naive: every axial slice, batch 1, no crop (whole slice resized to 224), fp32;
- embed_volume: foreground slices only, cropped, batched (batch size from free memory), fp32 on CPU.
Prints slices/s of both, their ratio, and achieved GFLOP/s as a fraction of a matmul peak measured here.

    .venv/bin/python benchmarks/embed_speed.py [--repeats 1]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from BrainDINOLib import Architecture, PreprocessConfig, embed_volume, read_volume
from BrainDINOLib.checkpoints import ModelCard, save_safetensors
from BrainDINOLib.encoder import load_encoder
from BrainDINOLib.resolution import LEGACY
from BrainDINOLib.slices import foreground_mask, normalise_intensity

SAMPLE = Path(__file__).resolve().parents[1] / "BrainDINOLib" / "data" / "colin27_t1.nii.gz"
VIT_S16 = Architecture(family="dinov3", embed_dim=384, depth=12, num_heads=6, patch_size=16)


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_image(encoder, size: int = 224) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        encoder.tokens(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def naive_loop(volume, encoder) -> int:
    """Every slice, one at a time, whole slice resized to 224 (the obvious first implementation)."""
    normalised = torch.from_numpy(normalise_intensity(volume.array, foreground_mask(volume), (0.5, 99.5)))
    for k in range(normalised.shape[0]):
        image = F.interpolate(normalised[k][None, None], size=(224, 224), mode="bilinear", align_corners=False)
        encoder.tokens(image.expand(-1, 3, -1, -1))
    return normalised.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/braindino-bench"))
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = save_safetensors(VIT_S16.build(), ModelCard("vit-s16-random", VIT_S16), args.work / "vits16.safetensors",
                                  dtype=torch.float32)
    encoder = load_encoder(checkpoint, device="cpu")
    volume = read_volume(SAMPLE)
    peak = matmul_peak_gflops()
    flops = flops_per_image(encoder)
    print(f"threads {torch.get_num_threads()}, matmul peak {peak:.1f} GFLOP/s, "
          f"ViT-S/16 at 224: {flops / 1e9:.2f} GFLOP per slice")

    start = time.perf_counter()
    naive_slices = naive_loop(volume, encoder)
    naive_s = time.perf_counter() - start

    start = time.perf_counter()
    features = embed_volume(volume, encoder, PreprocessConfig(), LEGACY)
    engine_s = time.perf_counter() - start

    for name, slices, seconds in (("naive loop", naive_slices, naive_s), ("embed_volume", features.num_slices, engine_s)):
        achieved = slices * flops / seconds / 1e9
        print(f"{name:13s} {slices:4d} slices in {seconds:6.2f} s = {slices / seconds:6.2f} slices/s, "
              f"{achieved:6.1f} GFLOP/s = {achieved / peak:5.1%} of matmul peak")
    print(f"volume time ratio naive / embed_volume: {naive_s / engine_s:.2f}x; "
          f"per-slice throughput ratio: {(features.num_slices / engine_s) / (naive_slices / naive_s):.2f}x")


if __name__ == "__main__":
    main()
