"""Segmentation heads on frozen patch tokens, and their assembly into a 3-D label volume.

Input: the patch tokens of one or more encoder blocks, concatenated along channels ([n, C, h, w]; the
BrainDINO paper used blocks 2, 5, 8, 11 of a ViT-B), at any voxel slice (interpolated between embedded
slices). Three heads:
- `LinearSegmentationHead`: BatchNorm + 1x1 convolution, one class score per cell (the linear probe).
- `MLPSegmentationHead`: BatchNorm + a per-cell two-layer MLP on channels-last rows (the few-shot default).
- `DecoderSegmentationHead`: 1x1 projection, then light 3x3-conv blocks each upsampling x2, so it predicts
  on a grid finer than the patches.
Training targets are the label slices, cropped to the same in-plane box as the model input and
area-averaged onto the head's output grid (soft targets: the class fractions of each cell); the loss is
cross-entropy plus soft Dice (`segmentation_loss`). Prediction upsamples the class scores to the voxels a
few slices at a time (guided by the image or bilinear, as the features' policy says), takes the arg-max,
and writes the label values on the input's grid (0 outside the foreground and the head's extent).
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
from ..features import MAP_CHUNK, VolumeFeatures
from ..slices import SliceGeometry, crop_box
from ..upsample import cell_means, interpolate_slices
from ..volume import Volume
from .head import Head
from .registry import create_head_module, head_kinds, register_head_kind, register_predictor
from .tasks import SEGMENTATION


@register_head_kind("linear", SEGMENTATION)
class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 convolution: class scores per patch ([S, C, h, w] -> [S, K, h, w])."""

    upscale = 1
    per_cell = True  # each cell's scores depend on that cell's tokens only

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.norm(x))

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(affine part, the rest): the whole head is affine per cell (in eval mode)."""
        return self, nn.Identity()


class PerCell(nn.Module):
    """Apply `layers` (acting on the last dimension) to every cell of [N, C, h, w]: linear layers on
    channels-last rows, several times faster on a CPU than the same maps as 1x1 convolutions."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        rows = self.layers(x.permute(0, 2, 3, 1).reshape(n * h * w, -1))
        return rows.reshape(n, h, w, -1).permute(0, 3, 1, 2)


@register_head_kind("mlp", SEGMENTATION)
class MLPSegmentationHead(nn.Module):
    """BatchNorm + a two-layer per-cell MLP (GELU): class scores per cell, nonlinear in the tokens. The
    few-shot default: from a few labelled slices it tells apart regions that a linear map of the tokens
    mixes up (mean lobe Dice 0.66 against 0.55 for the linear head, demo model, 5 slices)."""

    upscale = 1
    per_cell = True

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.layers = nn.Sequential(nn.BatchNorm1d(in_channels), nn.Linear(in_channels, hidden), nn.GELU(),
                                    nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return PerCell(self.layers)(x)

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(affine part, the rest): BatchNorm and the first linear layer are affine per cell (in eval mode)."""
        return PerCell(self.layers[:2]), PerCell(self.layers[2:])


@register_head_kind("decoder", SEGMENTATION)
class DecoderSegmentationHead(nn.Module):
    """1x1 projection, then `log2(upscale)` blocks of (x2 bilinear upsampling, 3x3 conv, BN, GELU), then a
    1x1 classifier: [S, C, h, w] -> [S, K, h * upscale, w * upscale]."""

    per_cell = False

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

    def split(self) -> tuple[nn.Module, nn.Module]:
        """(affine part, the rest): the projection and its BatchNorms are affine per cell (in eval mode)."""
        return self.layers[:3], self.layers[3:]


def make_segmentation_module(kind: str, in_channels: int, num_classes: int) -> tuple[nn.Module, dict]:
    """A fresh head module of `kind` (a registered segmentation kind) and its constructor arguments (for the card)."""
    arguments = {"in_channels": in_channels, "num_classes": num_classes}
    if kind not in head_kinds(SEGMENTATION):
        raise BrainDINOError(kind, f"unknown segmentation head; use one of {', '.join(head_kinds(SEGMENTATION))}")
    return create_head_module(kind, **arguments), arguments


# ---- inputs and targets ----------------------------------------------------------------------------------

def head_inputs(features: VolumeFeatures, layers: Sequence[int], slice_indices: Sequence[int]) -> Tensor:
    """The head input [n, C, h, w] float32 at voxel slices `slice_indices` (inside `features.covered`): the
    tokens of blocks `layers` concatenated (the final tokens when `layers` is empty), interpolated between
    embedded slices."""
    return features.tokens_at(slice_indices, layers).permute(0, 3, 1, 2).contiguous()


def check_covered(features: VolumeFeatures, slice_indices: Sequence[int]) -> None:
    """Refuse voxel slices without features (outside the head's extent)."""
    covered = features.covered
    outside = [int(k) for k in slice_indices if int(k) not in covered]
    if outside:
        raise BrainDINOError(features.source or "features", f"slice(s) {outside} have no features (no head "
                                                            f"there); slices {covered.start}..{covered.stop - 1} do")


def soft_targets(labels: np.ndarray, geometry: SliceGeometry, slice_indices: Sequence[int],
                 class_values: Sequence[int], upscale: int = 1) -> Tensor:
    """Class fractions [n, K, gh*upscale, gw*upscale] of label slices `slice_indices` over the grid's cells.

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
            raise BrainDINOError(f"label values {sorted(set(np.unique(box[classes < 0]).tolist()))} on slice {k}",
                                 f"are not among the classes {list(class_values)}")
        one_hot = F.one_hot(torch.from_numpy(classes), len(class_values)).permute(2, 0, 1).float()
        out[n] = cell_means(one_hot[None], geometry, upscale)[0]
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


@register_predictor(SEGMENTATION)
@torch.no_grad()
def segment(head: Head, features: VolumeFeatures, cleanup: bool = False) -> Volume:
    """Apply a segmentation head to a volume's features: a label `Volume` on the input's grid (uint8 or
    uint16 label values from the card; 0 = background), optionally keeping each label's largest component.

    Class scores are computed per grid cell of every voxel slice (features interpolated between embedded
    slices), upsampled to the voxels by the features' policy (guided by the image, or bilinear), and the
    best class wins; voxels outside the head mask and slices without features are background. The head's
    affine first part (`split`) runs on the embedded slices only and its output is interpolated: the same
    as interpolating the features first, because an affine map commutes with interpolation, at a fraction
    of the cost."""
    card = head.card
    if card.task != SEGMENTATION:
        raise BrainDINOError(card.task, "this head is not a segmentation head")
    card.check_encoder(features.model_id, features.source or None)
    module = head.module.eval()
    values = [c.value for c in card.classes]
    lookup = torch.as_tensor(values, dtype=torch.int64)
    dtype = label_dtype(values)
    affine, rest = module.split()
    slices = features.slices.slice_indices
    embedded = torch.cat([affine(head_inputs(features, card.layers, slices[start:start + MAP_CHUNK]))
                          for start in range(0, len(slices), MAP_CHUNK)])
    scores = features.map_volume(lambda ks: rest(interpolate_slices(embedded, features.slices, ks)),
                                 upscale=module.upscale, reduce=lambda voxels: lookup[voxels.argmax(dim=1)])
    labels = scores.array.astype(dtype)
    labels[~features.foreground] = 0
    if cleanup:
        labels = keep_largest_components(labels)
    return features.empty_volume(dtype).with_array(labels)
