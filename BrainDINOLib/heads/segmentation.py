"""Segmentation heads on frozen patch tokens, and their assembly into a 3-D label volume.

Input: the patch tokens of one or more encoder blocks, concatenated along channels ([S, C, h, w]; the
BrainDINO paper used blocks 2, 5, 8, 11 of a ViT-B). Two heads:
- `LinearSegmentationHead`: BatchNorm + 1x1 convolution, one class score per patch (the linear probe).
- `DecoderSegmentationHead`: 1x1 projection, then light 3x3-conv blocks each upsampling x2, so it predicts
  on a grid finer than the patches.
Training targets are the label slices, cropped to the same in-plane box as the model input and
area-averaged onto the head's output grid (soft targets: the class fractions of each cell); the loss is
cross-entropy plus soft Dice (`segmentation_loss`). Prediction upsamples the class scores bilinearly to
voxels a few slices at a time, takes the arg-max, and writes the label values on the input's grid (0
outside the foreground and on slices that were not embedded).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from scipy import ndimage
from torch import Tensor, nn

from ..errors import BrainDINOError
from ..features import VolumeFeatures
from ..slices import SliceGeometry, crop_box
from ..volume import Volume
from .head import Head, register_kind


@register_kind("linear")
class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 convolution: class scores per patch ([S, C, h, w] -> [S, K, h, w])."""

    upscale = 1

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.norm(x))


@register_kind("decoder")
class DecoderSegmentationHead(nn.Module):
    """1x1 projection, then `log2(upscale)` blocks of (x2 bilinear upsampling, 3x3 conv, BN, GELU), then a
    1x1 classifier: [S, C, h, w] -> [S, K, h * upscale, w * upscale]."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64, upscale: int = 4):
        super().__init__()
        if upscale < 1 or upscale & (upscale - 1):
            raise ValueError(f"upscale must be a power of two, got {upscale}")
        self.upscale = upscale
        layers: list[nn.Module] = [nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, hidden, 1),
                                   nn.BatchNorm2d(hidden), nn.GELU()]
        channels = hidden
        for _ in range(upscale.bit_length() - 1):
            out = max(16, channels // 2)
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, num_classes, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def make_segmentation_module(kind: str, in_channels: int, num_classes: int) -> tuple[nn.Module, dict]:
    """A fresh head module of `kind` ("linear" or "decoder") and its constructor arguments (for the card)."""
    arguments = {"in_channels": in_channels, "num_classes": num_classes}
    if kind not in ("linear", "decoder"):
        raise ValueError(f"unknown segmentation head {kind!r}; use 'linear' or 'decoder'")
    cls = LinearSegmentationHead if kind == "linear" else DecoderSegmentationHead
    return cls(**arguments), arguments


# ---- inputs and targets ----------------------------------------------------------------------------------

def patch_inputs(features: VolumeFeatures, layers: Sequence[int], positions: Sequence[int] | None = None) -> Tensor:
    """The head input [S, C, h, w] (fp16, as cached): the patch tokens of `layers` concatenated, or the
    final patch tokens when `layers` is empty. `positions` selects embedded slices (default: all)."""
    missing = [i for i in layers if i not in features.layers]
    if missing:
        have = sorted(features.layers) or "none"
        raise BrainDINOError(features.source or "features", f"lack encoder block(s) {missing} that the head "
                                                            f"reads (features hold blocks {have}); embed with "
                                                            f"layers={list(layers)}")
    maps = [features.layers[i] for i in layers] if layers else [features.patches]
    index = slice(None) if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
    return torch.cat([m[index] for m in maps], dim=-1).permute(0, 3, 1, 2).contiguous()


def slice_positions(features: VolumeFeatures, slice_indices: Sequence[int]) -> list[int]:
    """Positions in `features` of the volume's axial slices `slice_indices` (each must have been embedded)."""
    where = {k: p for p, k in enumerate(features.slices.slice_indices)}
    absent = [int(k) for k in slice_indices if int(k) not in where]
    if absent:
        first, last = features.slices.slice_indices[0], features.slices.slice_indices[-1]
        raise BrainDINOError(features.source or "features", f"slice(s) {absent} were not embedded (no "
                                                            f"foreground); embedded slices run {first}..{last}")
    return [where[int(k)] for k in slice_indices]


def soft_targets(labels: np.ndarray, geometry: SliceGeometry, slice_indices: Sequence[int],
                 class_values: Sequence[int], upscale: int = 1) -> Tensor:
    """Class fractions [n, K, h*upscale, w*upscale] of label slices `slice_indices` inside the input box.

    Voxels outside the volume count as background (class value 0); a label value not in `class_values`
    is an error (the caller decides the classes)."""
    lookup = np.full(int(max(labels.max(), max(class_values))) + 1, -1, dtype=np.int64)
    lookup[np.asarray(class_values)] = np.arange(len(class_values))
    rows_out, cols_out = geometry.grid[0] * upscale, geometry.grid[1] * upscale
    out = torch.empty((len(slice_indices), len(class_values), rows_out, cols_out))
    for n, k in enumerate(slice_indices):
        box = crop_box(labels[k:k + 1], geometry.box)[0]
        classes = lookup[box]
        if (classes < 0).any():
            raise ValueError(f"label values {sorted(set(np.unique(box[classes < 0]).tolist()))} on slice {k} "
                             f"are not among the classes {list(class_values)}")
        one_hot = F.one_hot(torch.from_numpy(classes), len(class_values)).permute(2, 0, 1).float()
        out[n] = F.adaptive_avg_pool2d(one_hot[None], (rows_out, cols_out))[0]
    return out


_SOFT_DICE = DiceLoss(include_background=False, softmax=True, batch=True)


def segmentation_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against class fractions (mean over cells) plus the soft Dice loss of the foreground
    classes over the whole batch ([N, K, H, W] both).

    Cross-entropy alone lets a head call small structures background: a lesion core or the CSF is a few
    percent of the cells, and fitted on four generated lesion cases the heads found almost no lesion (oedema
    Dice 0.005 or 0). The Dice term weighs every class equally whatever its size."""
    cross_entropy = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return cross_entropy + _SOFT_DICE(logits, targets)


# ---- prediction -------------------------------------------------------------------------------------------

@torch.no_grad()
def predict_label_indices(module: nn.Module, inputs: Tensor, geometry: SliceGeometry, chunk: int = 8) -> np.ndarray:
    """Class index per voxel [Z, Y, X] (int16; -1 on slices that were not embedded), from head inputs
    [S, C, h, w]. Scores are upsampled bilinearly to the box a few slices at a time, never all at once."""
    depth, height, width = geometry.volume_shape
    out = np.full((depth, height, width), -1, dtype=np.int16)
    row0, col0, rows, cols = geometry.box
    r_lo, c_lo = max(0, -row0), max(0, -col0)
    r_hi, c_hi = min(rows, height - row0), min(cols, width - col0)
    indices = np.asarray(geometry.slice_indices)
    module.eval()
    for start in range(0, inputs.shape[0], chunk):
        scores = module(inputs[start:start + chunk].float())
        scores = F.interpolate(scores, size=(rows, cols), mode="bilinear", align_corners=False)
        best = scores.argmax(dim=1)[:, r_lo:r_hi, c_lo:c_hi].numpy().astype(np.int16)
        out[indices[start:start + chunk], row0 + r_lo:row0 + r_hi, col0 + c_lo:col0 + c_hi] = best
    return out


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per label value, keep only its largest 3-D connected component (the rest becomes background)."""
    cleaned = np.zeros_like(labels)
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = ndimage.label(labels == value)
        if count:
            sizes = np.bincount(components.ravel())[1:]
            cleaned[components == 1 + int(sizes.argmax())] = value
    return cleaned


def label_dtype(values: Sequence[int]) -> np.dtype:
    return np.dtype(np.uint8) if max(values) < 256 else np.dtype(np.uint16)


def segment(head: Head, features: VolumeFeatures, cleanup: bool = False) -> Volume:
    """Apply a segmentation head to a volume's features: a label `Volume` on the input's grid (uint8 or
    uint16 label values from the card; 0 = background), optionally keeping each label's largest component."""
    card = head.card
    if card.task != "segmentation":
        raise BrainDINOError(card.task, "this head is not a segmentation head")
    card.check_encoder(features.model_id, features.source or None)
    indices = predict_label_indices(head.module, patch_inputs(features, card.layers), features.slices)
    values = [c.value for c in card.classes]
    lookup = np.asarray(values + [0], dtype=label_dtype(values))  # index -1 (not embedded) -> background
    labels = lookup[indices]
    labels[~features.foreground] = 0
    if cleanup:
        labels = keep_largest_components(labels)
    return features.empty_volume(labels.dtype).with_array(labels)
