"""CPU inference: every way an Encoder can run on this CPU against today's fp32 eager path, in one run.

Models: ViT-S/16 and ViT-B/16 of the released BrainDINO's architecture (timm Eva with DINOv3 RoPE, 4 registers;
random weights with LayerScale drawn from [0.1, 1] so every block matters), the bundled demo model, and any
`--model CHECKPOINT` (check a real BrainDINO's fidelity this way before trusting its default precision).
Inputs: axial slices of the bundled Colin27 T1 through `SliceStack`, at 224 px and at `--large` px, in
batches of the size `embed_volume` picks on a CPU; the blocks segmentation heads read (2, 5, 8, 11 of a
12-block ViT) are returned with the final tokens, as a feature request for a head would.

Candidates (`--candidates`):
- fp32: `Encoder(precision="fp32")`, the eager path every command ran before (the baseline);
- int8: `Encoder(precision="int8")`, dynamically quantised linear layers (the CPU default, "auto");
- bf16: bf16 autocast (measured only where a bf16 matmul is at least as fast as an fp32 one);
- compile: `torch.compile` of the fp32 backbone (inductor with frozen weights);
- ort-int8: ONNX Runtime on an int8 export (optional: needs onnxruntime, onnx and onnxscript);
- torchao-int8: torchao's int8 dynamic quantisation under torch.compile (optional: needs torchao).
Each candidate is timed on the same batch, interleaved with the others (A B C A B C ...), median of
`--repeats` rounds after one warm-up call; "one-off s" is what the first call cost beyond a timed one
(quantising, compiling, exporting). Its tokens are compared with fp32's: mean and 1st percentile of the
per-patch cosine similarity, for the final tokens and for each returned block.
Task fidelity (the demo model, fp32 against `--task-precision`): the tissue voxel probe's mean Dice
(BrainDINOLib/training/probe.py) and the demo's few-shot lobe Dice (BrainDINOLib/demo.py).

    .venv/bin/python benchmarks/cpu_inference.py [--models vit-s,vit-b,demo] [--large 640] [--repeats 3]
        [--candidates fp32,int8,bf16,compile] [--model CHECKPOINT] [--no-tasks] [--json out.json] [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config
from torch import Tensor, nn

from _common import (TINY, VIT_B16, VIT_S16, colin27_slices, gflops, interleaved_medians, machine_line,
                     matmul_gflops, patch_cosine, random_checkpoint, write_json)
from BrainDINOLib import read_volume
from BrainDINOLib.atlas import MNI152_GM, MNI152_T1, MNI152_WM
from BrainDINOLib.checkpoints import load_backbone, read_checkpoint
from BrainDINOLib.session import FeatureSession, segmentation_layers
from BrainDINOLib.embedding import auto_batch_size
from BrainDINOLib.encoder import Encoder, Tokens
from BrainDINOLib.inference import quantize_linears

RANDOM_MODELS = {"vit-s": VIT_S16, "vit-b": VIT_B16, "tiny": TINY}


class RunnerEncoder(Encoder):
    """An fp32 `Encoder` whose backbone calls go to another runner (compiled, or ONNX Runtime)."""

    def __init__(self, encoder: Encoder, runner: object):
        super().__init__(encoder.model, encoder.checkpoint, encoder.device, precision="fp32")
        self.replacement = runner

    @property
    def runner(self) -> object:
        return self.replacement


class _Intermediates(nn.Module):
    """forward(x) = (final tokens, *block outputs): the call `Encoder.tokens` makes, as a module to export."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        self.model, self.layers = model, list(layers)
        self.eval()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        final, intermediates = self.model.forward_intermediates(x, indices=self.layers, norm=True,
                                                                output_fmt="NLC")
        return (final, *intermediates)


class _ExportedRunner:
    """A backbone stand-in for `Encoder.tokens` over a callable that maps images to `_Intermediates` outputs."""

    def __init__(self, run: Callable[[Tensor], tuple[Tensor, ...]]):
        self.run = run

    def forward_intermediates(self, x: Tensor, **_: object) -> tuple[Tensor, list[Tensor]]:
        final, *intermediates = self.run(x)
        return final, list(intermediates)


def compiled(encoder: Encoder, images: Tensor, layers: tuple[int, ...]) -> Encoder:
    runner = copy.copy(encoder.model)
    runner.forward_intermediates = torch.compile(encoder.model.forward_intermediates)
    return RunnerEncoder(encoder, runner)


def onnx_runtime_int8(encoder: Encoder, images: Tensor, layers: tuple[int, ...]) -> Encoder:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="braindino-onnx-") as folder:
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        torch.onnx.export(_Intermediates(encoder.model, layers), (images,), fp32, dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
        session = onnxruntime.InferenceSession(int8, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return RunnerEncoder(encoder, _ExportedRunner(
        lambda x: tuple(torch.from_numpy(y) for y in session.run(None, {name: x.numpy()}))))


def torchao_int8(encoder: Encoder, images: Tensor, layers: tuple[int, ...]) -> Encoder:
    # Importing the x86 quantizer registers the inductor passes that fuse int8 matmuls; without them (or
    # without freezing) the compiled model ran 10x slower than fp32.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    module = _Intermediates(copy.deepcopy(encoder.model), layers)
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return RunnerEncoder(encoder, _ExportedRunner(torch.compile(module)))


def precision(name: str) -> Callable[[Encoder, Tensor, tuple[int, ...]], Encoder]:
    def build(encoder: Encoder, images: Tensor, layers: tuple[int, ...]) -> Encoder:
        return Encoder(encoder.model, encoder.checkpoint, encoder.device, precision=name)
    return build


CANDIDATES = {"fp32": precision("fp32"), "int8": precision("int8"), "bf16": precision("bf16"),
              "compile": compiled, "ort-int8": onnx_runtime_int8, "torchao-int8": torchao_int8}


def kernel_peaks(size: int) -> dict[str, float]:
    """GFLOP/s of a size^3 matmul in fp32 and bf16, and of an int8 dynamic linear layer of the same size."""
    linear = quantize_linears(nn.Linear(size, size, bias=False))
    x = torch.randn(size, size)
    return {"fp32": matmul_gflops(torch.float32, size), "bf16": matmul_gflops(torch.bfloat16, size),
            "int8": gflops(lambda: linear(x), 2 * size**3)}


def compare(model_name: str, encoder: Encoder, image_size: int, candidates: list[str], repeats: int,
            batch: int | None) -> list[dict]:
    """One row per candidate: preparation seconds, ms per slice, speed-up over fp32, cosine fidelity."""
    layers = segmentation_layers(encoder.architecture.depth)
    batch = batch or auto_batch_size(encoder, image_size)
    images = colin27_slices(encoder, image_size, batch)
    encoders, prepare, outputs = {}, {}, {}
    for name in candidates:
        try:
            start = time.perf_counter()
            # Freezing lets inductor fold the frozen weights into its CPU kernels (what makes int8 fast); it
            # applies when the first call compiles (passed through torch.compile's options it did not).
            with torch._inductor.config.patch(freezing=True):
                encoders[name] = CANDIDATES[name](encoder, images, layers)
                outputs[name] = encoders[name].tokens(images, layers)  # warm-up; compiles or quantises
            prepare[name] = time.perf_counter() - start
        except ImportError as error:
            print(f"  {name}: skipped ({error.name} is not installed)")
    medians = interleaved_medians({name: (lambda e=e: e.tokens(images, layers)) for name, e in encoders.items()},
                                  repeats)
    reference: Tokens = outputs["fp32"]
    rows = []
    for name in encoders:
        one_off = max(0.0, prepare[name] - medians[name])  # quantising, compiling or exporting, beyond one batch
        final = patch_cosine(outputs[name].patches, reference.patches)
        blocks = {i: patch_cosine(outputs[name].layers[i], reference.layers[i]) for i in layers}
        rows.append({"model": model_name, "image_size": image_size, "batch": batch, "candidate": name,
                     "one_off_s": one_off, "ms_per_slice": medians[name] / batch * 1e3,
                     "speedup": medians["fp32"] / medians[name], "cosine_final": final,
                     "cosine_blocks": {str(i): c for i, c in blocks.items()}})
    return rows


def print_header() -> None:
    print(f"{'model':10s} {'px':>4s} {'batch':>5s} {'candidate':13s} {'one-off s':>9s} {'ms/slice':>9s} "
          f"{'speed-up':>8s}  {'cosine to fp32: final mean/p1':>29s}  blocks (mean)")


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        blocks = " ".join(f"{i}:{c[0]:.4f}" for i, c in row["cosine_blocks"].items())
        print(f"{row['model']:10s} {row['image_size']:4d} {row['batch']:5d} {row['candidate']:13s} "
              f"{row['one_off_s']:9.1f} {row['ms_per_slice']:9.1f} {row['speedup']:7.2f}x  "
              f"{row['cosine_final'][0]:20.4f}/{row['cosine_final'][1]:.4f}  {blocks}", flush=True)


def task_fidelity(precision_name: str, work: Path) -> dict[str, dict[str, float]]:
    """The demo model's tissue voxel probe mean Dice and demo few-shot lobe Dice, fp32 against `precision_name`."""
    from BrainDINOLib.demo import DemoConfig, run_demo
    from BrainDINOLib.training.probe import tissue_probe
    from BrainDINOLib.resolution import LEGACY
    from BrainDINOLib.tissue import tissue_classes

    labels = tissue_classes(read_volume(MNI152_GM), read_volume(MNI152_WM))
    t1 = read_volume(MNI152_T1)
    results: dict[str, dict[str, float]] = {}
    for name in ("fp32", precision_name):
        session = FeatureSession.open("demo", "cpu", LEGACY, precision=name)
        probe = tissue_probe(session, t1, labels, baselines=False)
        demo = run_demo(work / f"demo-{name}", DemoConfig(policy=LEGACY, precision=name, compare_with=None))
        results[name] = {"tissue probe voxel mean Dice": probe[f"model ({session.encoder.model_id})"]["voxel"]["mean"],
                         "few-shot lobe mean Dice": float(np.mean(list(demo.dice.values()))),
                         "demo features s": demo.seconds["features"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit-s,vit-b,demo", help="of vit-s, vit-b, demo (comma-separated)")
    parser.add_argument("--model", action="append", default=[], help="also this checkpoint (repeatable)")
    parser.add_argument("--sizes", default=None, help="input sizes in px (default: 224 and --large)")
    parser.add_argument("--large", type=int, default=640,
                        help="the larger input size (default 640: about 6 mm patches over a head's field of view)")
    parser.add_argument("--candidates", default="fp32,int8,bf16,compile", help=f"of {', '.join(CANDIDATES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per candidate (median)")
    parser.add_argument("--batch", type=int, default=None, help="slices per batch (default: embed_volume's)")
    parser.add_argument("--task-precision", default="int8", help="compared with fp32 on the probe and the demo")
    parser.add_argument("--no-tasks", action="store_true", help="skip the tissue probe and demo Dice")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "braindino-bench")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models and sizes, one thread, seconds: checks that the script runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.smoke:
        args.models, args.sizes, args.candidates, args.repeats, args.batch = "tiny,demo", "32", "fp32,int8", 1, 2
        args.no_tasks, args.threads = True, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [224, args.large]
    candidates = ["fp32"] + [c for c in args.candidates.split(",") if c and c != "fp32"]
    unknown = set(candidates) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(sorted(unknown))}; choose from {', '.join(CANDIDATES)}")

    print(machine_line())
    kernel_size = 256 if args.smoke else 1024
    peaks = kernel_peaks(kernel_size)
    print(f"kernels, GFLOP/s of a {kernel_size}^3 product: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    if "bf16" in candidates and peaks["bf16"] < peaks["fp32"]:
        candidates.remove("bf16")
        print(f"bf16: skipped (its matmul runs at {peaks['bf16'] / peaks['fp32']:.0%} of fp32's on this CPU)")

    sources = {name: (random_checkpoint(RANDOM_MODELS[name], args.work / f"{name}.safetensors")
                      if name in RANDOM_MODELS else name) for name in args.models.split(",") if name}
    sources.update({Path(path).stem: path for path in args.model})
    rows = []
    print_header()
    for model_name, source in sources.items():
        checkpoint = read_checkpoint(source)
        encoder = Encoder(load_backbone(checkpoint), checkpoint, torch.device("cpu"), precision="fp32")
        for size in sizes:
            new = compare(model_name, encoder, size, candidates, args.repeats, args.batch)
            print_rows(new)
            rows.extend(new)

    tasks = None
    if not args.no_tasks:
        tasks = task_fidelity(args.task_precision, args.work)
        print(f"demo model at 224 px: fp32 against {args.task_precision}")
        for figure in next(iter(tasks.values())):
            values = {name: result[figure] for name, result in tasks.items()}
            delta = values[args.task_precision] - values["fp32"]
            scores = "  ".join(f"{name} {value:.3f}" for name, value in values.items())
            print(f"  {figure:30s} {scores}  (difference {delta:+.3f})")
    write_json(args.json, {"machine": machine_line(), "kernels_gflops": peaks, "rows": rows, "tasks": tasks})


if __name__ == "__main__":
    main()
