"""Can the pretraining data path feed a GPU? Crops per second per CPU core, the step split into data and compute,
and how many cores a ViT-B/16 step on one modern GPU needs.

1. Crops per second on ONE CPU thread (= per core), for the ViT-B recipe's crops (2 global 224 px + 8 local
   96 px from each 224-px slice) and the demo's (2 x 128 + 4 x 64), interleaved A B C A B C ... and repeated:
   - baseline: the pipeline before the batched one (commit d840fec): per slice one `grid_sample` per crop size,
     then MONAI's intensity transforms (gamma, bias field, contrast, blur, noise) crop by crop;
   - CPU path: `MultiCrop.draw` + `MultiCrop.render` on the whole batch (what a CPU run's loader does);
   - device path, CPU share: reading the slices and drawing the parameters only (the crops are rendered on
     the GPU), counted in crops the GPU will render from them;
   - synthetic slices (`SyntheticBrains`) per second, which the loader generates in either path.
2. The demo recipe's step (`Training/configs/demo.yaml`, its model and batch, one thread): seconds spent
   making the batch (data) and in `training_step` (compute), for the baseline on shards, the CPU path on
   shards, and the CPU path with half of every batch synthetic (the new demo recipe).
3. FLOPs of one ViT-B/16 training step per slice (torch's FlopCounterMode: student forward + backward on
   all crops, teacher forward on the global crops), the GPU's slice rate at an ASSUMED throughput (H100/H200
   bf16 dense 989 TFLOP/s at 40 % MFU; change with --tflops and --mfu), and the CPU cores each path needs.

    .venv/bin/python benchmarks/pretrain_data.py [--repeats 3] [--steps 4] [--tflops 989 --mfu 0.4]
    .venv/bin/python benchmarks/pretrain_data.py --smoke     # seconds: tiny sizes, checks it runs
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAdjustContrast, RandBiasField, RandGaussianNoise, RandGaussianSmooth,
                              RandScaleIntensityFixedMean)
from monai.utils import convert_to_tensor
from torch.utils.flop_counter import FlopCounterMode

from _common import timed
from BrainDINOLib.atlas import COLIN27_T1
from BrainDINOLib.training import SliceShards, load_config, prepare_slices
from BrainDINOLib.training.augment import MultiCrop
from BrainDINOLib.training.batches import StepBatch, StepBatches, seeded_generator
from BrainDINOLib.training.config import CropConfig, ModelConfig, PretrainConfig
from BrainDINOLib.training.model import build_network
from BrainDINOLib.training.optim import Schedules, apply_step_values, build_optimizer
from BrainDINOLib.training.synthbrain import SyntheticBrains
from BrainDINOLib.training.trainer import Losses, training_step

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "Training" / "configs" / "demo.yaml"
MICRO_CONFIG = REPO / "Training" / "configs" / "micro.yaml"
VIT_B = ModelConfig(embed_dim=768, depth=12, num_heads=12)
VIT_B_CROPS = CropConfig(global_size=224, local_count=8, local_size=96)


class BaselineMultiCrop:
    """The multi-crop of commit d840fec: per slice, one affine resampling per crop size, then MONAI's
    intensity transforms crop by crop (re-seeded from the step's generator for every crop)."""

    def __init__(self, config: CropConfig):
        c = self.config = config
        self.geometry = MultiCrop(config)  # the same crop geometry draw
        self.intensity = Compose([
            RandAdjustContrast(prob=c.gamma_probability, gamma=c.gamma_range),
            RandBiasField(prob=c.bias_field_probability, coeff_range=c.bias_field_coefficients),
            RandScaleIntensityFixedMean(prob=c.contrast_probability,
                                        factors=(c.contrast_range[0] - 1, c.contrast_range[1] - 1)),
            RandGaussianSmooth(prob=c.blur_probability, sigma_x=c.blur_sigma, sigma_y=c.blur_sigma),
            RandGaussianNoise(prob=c.noise_probability, std=c.noise_std),
        ])

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return (self._crops(image, 2, c.global_size, c.global_scale, generator),
                self._crops(image, c.local_count, c.local_size, c.local_scale, generator))

    def _crops(self, image, count, size, scale, generator):
        background = image.min()
        theta = self.geometry._affines(count, scale, generator).float()
        grid = F.affine_grid(theta, [count, 1, size, size], align_corners=False)
        crops = F.grid_sample((image - background).expand(count, 1, -1, -1), grid, mode="bilinear",
                              padding_mode="zeros", align_corners=False)
        out = []
        for crop in crops:
            self.intensity.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            out.append(convert_to_tensor(self.intensity(crop), dtype=torch.float32, track_meta=False))
        return torch.stack(out) + background

    def batch(self, batches: StepBatches, step: int) -> StepBatch:
        """A shards-only step as the old `StepBatches` made it."""
        generator = seeded_generator(batches.seed, step, batches.rank, 2)
        indices = batches.slice_indices(step)
        views = [self(batches.shards[int(i)], generator) for i in indices]
        return StepBatch(torch.stack([v[0] for v in views], dim=1).flatten(0, 1),
                         torch.stack([v[1] for v in views], dim=1).flatten(0, 1), batches._masks(generator), indices)


def crop_rates(shards: SliceShards, crops: CropConfig, slices: int, repeats: int) -> dict[str, float]:
    """Crops per second on this thread for each path (median of `repeats` interleaved rounds)."""
    baseline, batched = BaselineMultiCrop(crops), MultiCrop(crops)
    per_slice = 2 + crops.local_count
    images = [shards[i % len(shards)] for i in range(slices)]

    def run_baseline():
        generator = torch.Generator().manual_seed(0)
        for image in images:
            baseline(image, generator)

    def run_cpu_path():
        stacked = torch.stack(images)
        batched.render(stacked, batched.draw(len(images), torch.Generator().manual_seed(0)))

    def run_device_share():  # what a worker does when the GPU renders: read the slices, draw the parameters
        stacked = torch.stack([shards[i % len(shards)] for i in range(slices)])
        batched.draw(len(stacked), torch.Generator().manual_seed(0))

    paths = {"baseline (MONAI per crop)": run_baseline, "CPU path (batched tensor ops)": run_cpu_path,
             "device path, CPU share": run_device_share}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            seconds[name].append(timed(run))
    return {name: slices * per_slice / statistics.median(values) for name, values in seconds.items()}


def synthetic_rate(synthetic: SyntheticBrains, count: int) -> float:
    import numpy as np

    synthetic.slice(np.random.default_rng(0))  # builds the label maps once
    return count / timed(lambda: [synthetic.slice(np.random.default_rng(i)) for i in range(1, count + 1)])


def step_split(config: PretrainConfig, batches: StepBatches, make_batch, steps: int) -> tuple[float, float]:
    """Mean seconds per step spent making the batch and in `training_step` (after one warm-up step)."""
    torch.manual_seed(0)
    student = build_network(config.model, config.loss)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    losses = Losses(config)
    optimizer = build_optimizer(student, student.architecture.depth, config.optim)
    schedules = Schedules(config.optim, config.loss, config.optim.batch_size)
    data, compute = [], []
    for step in range(steps + 1):
        started = time.perf_counter()
        batch = make_batch(step)
        made = time.perf_counter()
        values = schedules.at(step)
        apply_step_values(optimizer, values)
        training_step(student, teacher, losses, optimizer, batch, values, config.optim.clip_grad)
        if step:
            data.append(made - started)
            compute.append(time.perf_counter() - made)
    return statistics.mean(data), statistics.mean(compute)


def flops_per_slice(model: ModelConfig, crops: CropConfig, config: PretrainConfig) -> float:
    """FLOPs of one training step for one slice: student forward + backward on all its crops, teacher forward
    on its global crops (heads included; the optimizer and EMA are negligible)."""
    torch.manual_seed(0)
    student = build_network(model, config.loss)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    side = crops.global_size // model.patch_size
    global_crops = torch.randn(2, model.in_chans, crops.global_size, crops.global_size)
    local_crops = torch.randn(crops.local_count, model.in_chans, crops.local_size, crops.local_size)
    masks = torch.zeros(2, side * side, dtype=torch.bool)
    masks[0, : side * side // 4] = True
    with FlopCounterMode(display=False) as counter:
        out = student(global_crops, local_crops, masks)
        (out.dino_global.sum() + out.dino_local.sum() + out.ibot_masked.sum()).backward()
        with torch.no_grad():
            teacher(global_crops, None, masks)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=16, help="slices per timed round")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per recipe")
    parser.add_argument("--tflops", type=float, default=989.0, help="GPU dense bf16 TFLOP/s (H100/H200 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that it runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    demo = load_config(MICRO_CONFIG if args.smoke else DEMO_CONFIG)
    gpu_model, gpu_crops = (demo.model, demo.crops) if args.smoke else (VIT_B, VIT_B_CROPS)
    image_size = 64 if args.smoke else 224
    if args.smoke:
        args.repeats, args.slices, args.steps = 1, 2, 1
        demo = replace(demo, synthetic=replace(demo.synthetic, spacing_mm=2.0),
                       optim=replace(demo.optim, batch_size=4))
    with tempfile.TemporaryDirectory() as folder:
        prepare_slices([COLIN27_T1], folder, image_size=image_size)
        shards = SliceShards(folder)
        print(f"shards: the bundled Colin27 T1, {len(shards)} slices of {image_size} px; one CPU thread\n")

        print("1. crops per second per CPU core (median of", args.repeats, "interleaved rounds)")
        rates = {}
        gpu_label = "micro recipe (smoke)" if args.smoke else "ViT-B recipe"
        for label, crops in ((gpu_label, gpu_crops), ("demo recipe", demo.crops)):
            rates[label] = crop_rates(shards, crops, args.slices, args.repeats)
            base = rates[label]["baseline (MONAI per crop)"]
            print(f"   {label}: 2 x {crops.global_size} px + {crops.local_count} x {crops.local_size} px per slice")
            for name, rate in rates[label].items():
                print(f"     {name:34s} {rate:9.1f} crops/s   x{rate / base:6.1f}")
        synthetic = SyntheticBrains(demo.synthetic, image_size)
        synthetic_per_s = synthetic_rate(synthetic, 2 if args.smoke else 10)
        print(f"     synthetic slices (SyntheticBrains)  {synthetic_per_s:9.1f} slices/s")

        print(f"\n2. demo recipe step ({demo.model.embed_dim}-dim x {demo.model.depth} blocks, "
              f"batch {demo.optim.batch_size}): seconds per step, data + compute")
        batch = demo.optim.batch_size
        make = lambda count: StepBatches(shards, demo.crops, demo.loss, batch, demo.model.patch_size,
                                         demo.model.in_chans, seed=0, synthetic=synthetic, synthetic_slices=count)
        baseline = BaselineMultiCrop(demo.crops)
        recipes = {"baseline, shards only": (make(0), lambda b: (lambda step: baseline.batch(b, step))),
                   "CPU path, shards only": (make(0), lambda b: b.__getitem__),
                   "CPU path, half synthetic": (make(batch // 2), lambda b: b.__getitem__)}
        for name, (batches, maker) in recipes.items():
            data_s, compute_s = step_split(demo, batches, maker(batches), args.steps)
            print(f"   {name:26s} data {data_s:6.2f} s + compute {compute_s:6.2f} s "
                  f"(data {100 * data_s / (data_s + compute_s):4.1f} % of the step)")

    flops = flops_per_slice(gpu_model, gpu_crops, demo)
    effective = args.tflops * 1e12 * args.mfu
    slices_per_s = effective / flops
    crops_per_s = slices_per_s * (2 + gpu_crops.local_count)
    print(f"\n3. one GPU: {gpu_label} step = {flops / 1e9:.1f} GFLOP per slice; assumed {args.tflops:.0f} TFLOP/s "
          f"bf16 dense at {100 * args.mfu:.0f} % MFU -> {slices_per_s:.0f} slices/s = {crops_per_s:.0f} crops/s")
    for name, rate in rates[gpu_label].items():
        print(f"   {name:34s} needs {crops_per_s / rate:7.1f} CPU cores")
    print(f"   + each synthetic share s of the batch needs s x {slices_per_s / synthetic_per_s:.0f} cores "
          f"({synthetic_per_s:.1f} synthetic slices/s per core)")


if __name__ == "__main__":
    main()
