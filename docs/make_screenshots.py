"""Re-draw the extension's pictures (docs/screenshot-*.png) from what the module computes, as the demo does:

    .venv/bin/braindino demo --out demo-output && .venv/bin/python docs/make_screenshots.py demo-output

They show the module's overlays (PCA colours, few-shot lobes) on the bundled Colin27 T1, drawn by
BrainDINOLib.montage; they are not captures of Slicer's window.
"""
import sys
from pathlib import Path

import SimpleITK as sitk

from BrainDINOLib import read_volume
from BrainDINOLib.atlas import COLIN27_T1
from BrainDINOLib.montage import OverlayStyle, save_montage

DOCS = Path(__file__).resolve().parent


def main(demo_output: Path) -> None:
    t1 = read_volume(COLIN27_T1)
    pca = t1.with_array(sitk.GetArrayFromImage(sitk.ReadImage(str(demo_output / "pca_rgb.nii.gz"))))
    lobes = read_volume(demo_output / "fewshot_lobes.nii.gz")
    names = {int(line.split()[0]): " ".join(line.split()[1:])
             for line in (demo_output / "fewshot_lobes.txt").read_text().splitlines() if line.strip()}
    save_montage(t1, pca, DOCS / "screenshot-pca.png", OverlayStyle("rgb", alpha=0.6), mask=t1.array > 30,
                 title="BrainDINO: PCA colours of the demo model's features (Colin27 T1)")
    save_montage(t1, lobes, DOCS / "screenshot-fewshot.png",
                 OverlayStyle("labels", alpha=0.5, names={k: v for k, v in names.items() if k}),
                 title="BrainDINO: lobes learned from 5 painted axial slices (few-shot, demo model)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
