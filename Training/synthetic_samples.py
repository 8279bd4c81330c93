"""A grid of synthetic training brains (BrainDINOLib/training/synthbrain.py): one row per contrast (T1-, T2-,
FLAIR-, PD-like and fully random), random slices as the pretraining sees them, and the tissue labels of the
row's last slice.

    .venv/bin/python Training/synthetic_samples.py BrainDINOLib/models/synthetic_samples.png [--per-row 6]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from BrainDINOLib.atomic import atomic_path  # noqa: E402
from BrainDINOLib.errors import report_errors  # noqa: E402
from BrainDINOLib.tissue import CLASS_NAMES  # noqa: E402
from BrainDINOLib.training.config import SyntheticConfig  # noqa: E402
from BrainDINOLib.training.synthbrain import CONTRASTS, SyntheticBrains  # noqa: E402

TISSUE_COLOURS = ListedColormap(["black", "#3b8bd9", "#9a9a9a", "#f2f2f2"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="PNG to write")
    parser.add_argument("--per-row", type=int, default=6, help="slices per contrast")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    figure, axes = plt.subplots(len(CONTRASTS), args.per_row + 1, figsize=(1.9 * (args.per_row + 1),
                                                                             1.9 * len(CONTRASTS)))
    for row, contrast in enumerate(CONTRASTS):
        config = replace(SyntheticConfig(), contrast_weights=tuple(float(c == contrast) for c in CONTRASTS))
        brains = SyntheticBrains(config, 224)
        for column in range(args.per_row):
            generated = brains.slice(np.random.default_rng([args.seed, row, column]))
            image = generated.image[0].numpy()
            low, high = np.percentile(image, [1, 99.5])
            axes[row, column].imshow(image, cmap="gray", vmin=low, vmax=high)
        axes[row, -1].imshow(generated.tissue, cmap=TISSUE_COLOURS, vmin=0, vmax=3, interpolation="nearest")
        axes[row, 0].set_ylabel(f"{contrast}-like" if contrast != "random" else "random", fontsize=11)
    axes[0, -1].set_title("tissue of the\nlast slice", fontsize=9)
    for axis in axes.ravel():
        axis.set_xticks([]), axis.set_yticks([])
    figure.suptitle(f"Synthetic training brains (labels: {', '.join(CLASS_NAMES[1:])})", fontsize=11)
    figure.tight_layout()
    with atomic_path(args.output) as tmp:
        figure.savefig(tmp, dpi=60, format="png")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(report_errors("synthetic_samples", main))
