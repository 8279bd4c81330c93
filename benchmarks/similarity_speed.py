"""Similarity-to-a-point speed on CPU once features exist: milliseconds per new point on the Colin27 volume.

Features: the bundled Colin27 T1 (181 x 217 x 181, 1 mm; 171 slices of 14 x 14 patches at 224 px) embedded
by a DINOv3 ViT of the released BrainDINO's width (embed 768; one block, random weights: the cost of a
similarity map depends on the token count and width only, not on the weights or depth).
Measured in the same run:
- index: building `SimilarityIndex` once (token norms and neighbouring-slice products) and its first map (which
  computes the guided upsampling weights it keeps, and their memory);
- per point: `SimilarityIndex.map(point)` for random head voxels (median and 90th percentile), and
  `SimilarityIndex.map_planes` of the axial, coronal and sagittal planes through the point (what a viewer shows
  first), with torch's default thread count and with one thread (on a machine shared with other jobs, one
  thread is faster);
- baselines: `similarity_map(features, point)` (builds the index every time and keeps no weights: each map as
  before the index kept them), the engine's generic `VolumeFeatures.to_volume` of one per-patch map, and one copy
  of a voxel volume (the floor: touching every output voxel once).

    .venv/bin/python benchmarks/similarity_speed.py [--points 40] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import TINY
from BrainDINOLib import Architecture, embed_volume, read_volume
from BrainDINOLib.atlas import COLIN27_T1
from BrainDINOLib.checkpoints import ModelCard, save_safetensors
from BrainDINOLib.encoder import load_encoder
from BrainDINOLib.features import Planes
from BrainDINOLib.maps import SimilarityIndex, similarity_map
from BrainDINOLib.resolution import DEFAULTS, ResolutionPolicy

WIDE = Architecture(family="dinov3", embed_dim=768, depth=1, num_heads=12, patch_size=16)


def milliseconds(function, repeats: int) -> np.ndarray:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return np.array(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=40, help="random points to map")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "braindino-bench")
    parser.add_argument("--smoke", action="store_true",
                        help="a narrow model at 16-mm patches, 3 points, one thread: checks that the script runs")
    args = parser.parse_args()
    architecture, policy = WIDE, DEFAULTS["cpu"]
    if args.smoke:
        architecture, policy, args.points = TINY, ResolutionPolicy(patch_mm=16.0), 3
        torch.set_num_threads(1)
    torch.manual_seed(0)
    checkpoint = save_safetensors(architecture.build(), ModelCard("similarity-bench-random", architecture),
                                  args.work / f"width{architecture.embed_dim}.safetensors", dtype=torch.float32)
    volume = read_volume(COLIN27_T1)
    features = embed_volume(volume, load_encoder(checkpoint, device="cpu"), policy=policy)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
          f"features: {features.num_slices} slices x {features.grid} patches "
          f"x {features.patches.shape[-1]} dims; volume {volume.shape}")

    start = time.perf_counter()
    index = SimilarityIndex(features)
    build_ms = (time.perf_counter() - start) * 1e3

    rng = np.random.default_rng(0)
    head = np.argwhere(features.foreground[list(features.slices.slice_indices)])
    picks = head[rng.choice(len(head), size=args.points, replace=False)]
    points = [volume.geometry.index_to_lps(np.array([[features.slices.slice_indices[s], j, i]]))[0]
              for s, j, i in picks]

    start = time.perf_counter()
    index.map(points[0])
    first_ms = (time.perf_counter() - start) * 1e3
    planes = [Planes(*((int(v),) for v in volume.geometry.lps_to_index(point[None])[0].round())) for point in points]

    def per_point_ms(method) -> np.ndarray:
        times = []
        for point, shown in zip(points, planes):
            start = time.perf_counter()
            similarity = index.map(point) if method == "map" else index.map_planes(point, shown)
            times.append((time.perf_counter() - start) * 1e3)
            assert -1.0 <= similarity.array.min() and similarity.array.max() <= 1.0
        return np.array(times)

    threads = torch.get_num_threads()
    per_setting = {}
    for setting in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(setting)
        for method in ("map", "map_planes"):
            per_setting[setting, method] = per_point_ms(method)
    torch.set_num_threads(threads)
    per_point = per_setting[threads, "map"]

    rebuild = milliseconds(lambda: similarity_map(features, points[0]), 3)
    one_map = index.tokens @ index.query(points[0])
    generic_upsample = milliseconds(lambda: features.to_volume(one_map), 5)
    floor = milliseconds(lambda: volume.array.copy(), 10)

    median = np.median(per_point)
    print(f"index build (once)                 {build_ms:8.1f} ms")
    print(f"first map (computes the weights)   {first_ms:8.1f} ms; weights kept: "
          f"{index.upsampler.weights.kept_bytes / 2**20:.0f} MiB" if features.policy.upsampling == "guided"
          else f"first map                          {first_ms:8.1f} ms")
    for (setting, method), times in per_setting.items():
        print(f"SimilarityIndex.{method:10s} {setting:2d} thread(s) {np.median(times):8.1f} ms median per point, "
              f"{np.percentile(times, 90):.1f} ms p90 ({args.points} points)")
    print(f"similarity_map (index every time)  {np.median(rebuild):8.1f} ms  = {np.median(rebuild) / median:5.1f}x")
    print(f"to_volume of one per-patch map     {np.median(generic_upsample):8.1f} ms  "
          f"= {np.median(generic_upsample) / median:5.1f}x")
    print(f"copy of one voxel volume (floor)   {np.median(floor):8.1f} ms  = {np.median(floor) / median:5.2f}x")


if __name__ == "__main__":
    main()
