"""How an `Encoder` runs its backbone: the numeric precision, and the int8 CPU path that keeps features faithful.

Precisions (`--precision` in the CLI, `load_encoder(..., precision=)` in Python):

- ``fp32``: the timm backbone exactly as loaded.
- ``int8`` (CPU): every `nn.Linear` of a copy of the backbone quantised dynamically (weights int8 per output
  channel once, activations int8 on the fly, one slice at a time so that a slice's tokens never depend on its
  batch; PyTorch's fbgemm/x86 kernels). On an AVX2 CPU the linear layers, about 80 % of a ViT-B's time at
  224 px, ran about 1.8x faster: 1.6x for the whole model at 224 px, 1.24x at 640 px, where attention
  (untouched, fp32) takes a larger share. Patch tokens keep a mean cosine similarity above 0.999 to fp32
  (`benchmarks/cpu_inference.py`).
- ``bf16``: bf16 autocast. The default on CUDA; allowed on a CPU, where it only pays with AMX or AVX512-BF16
  (on an AVX2 CPU it was far slower than fp32).
- ``auto``: bf16 on CUDA, int8 on an x86-64 CPU, fp32 elsewhere (Apple MPS; ARM CPUs, where the int8 path
  has not been measured).

Features from different precisions are close but not bit-identical: heads and similarity maps accept each
other's (same `model_id`), the feature cache keeps them apart (`Encoder.feature_id`).
"""
from __future__ import annotations

import contextlib
import logging
import platform
import warnings

import torch
from torch import nn

from .errors import BrainDINOError
from .precision import PRECISIONS

log = logging.getLogger(__name__)

SUPPORTED = {"cpu": ("fp32", "int8", "bf16"), "cuda": ("fp32", "bf16"), "mps": ("fp32",)}


def int8_kernels_available() -> bool:
    """Whether PyTorch has its fast int8 CPU kernels here (fbgemm/x86: x86-64 CPUs)."""
    engines = torch.backends.quantized.supported_engines
    return platform.machine().lower() in ("x86_64", "amd64") and ("x86" in engines or "fbgemm" in engines)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision ("fp32", "int8" or "bf16") that `precision` means on `device`."""
    if precision not in PRECISIONS:
        raise BrainDINOError(precision, f"is not a precision; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16"
        return "int8" if device.type == "cpu" and int8_kernels_available() else "fp32"
    allowed = SUPPORTED.get(device.type, ("fp32",))
    if precision not in allowed:
        raise BrainDINOError(precision, f"is not available on {device.type}; choose one of {', '.join(allowed)}")
    return precision


def quantize_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `nn.Linear` layers run dynamically quantised int8 (per-channel weights).

    `torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao, whose CPU int8 path needs
    torch.compile (minutes of compilation, measured in benchmarks/cpu_inference.py); it is the fastest eager
    int8 path in the pinned torch, so its deprecation warning is silenced here.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)


def inference_model(model: nn.Module, precision: str) -> nn.Module:
    """The module that runs `model` at a resolved `precision`: `model` itself, or its int8 copy."""
    if precision != "int8":
        return model
    quantized = quantize_linears(model)
    log.info("backbone linear layers quantised to int8 (%d layers)",
             sum(1 for m in model.modules() if isinstance(m, nn.Linear)))
    return quantized


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16". On CUDA, autocast is switched off for fp32, so that an autocast around the
    call (the engine wraps CUDA batches in one) cannot change an fp32 encoder."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()
