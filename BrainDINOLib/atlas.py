"""The bundled templates and the AAL atlas: file locations, region names, and AAL merged into lobes.

One definition of the lobes serves the demo (few-shot lobe segmentation) and the case generator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
COLIN27_T1 = DATA / "colin27_t1.nii.gz"
COLIN27_AAL = DATA / "colin27_aal.nii.gz"
AAL_TABLE = DATA / "colin27_aal.txt"
MNI152_T1 = DATA / "mni152_2009a_t1.nii.gz"
MNI152_GM = DATA / "mni152_2009a_gm.nii.gz"
MNI152_WM = DATA / "mni152_2009a_wm.nii.gz"

# AAL regions grouped into lobes by region-name prefix (both hemispheres); lobe label = position + 1.
LOBES: dict[str, tuple[str, ...]] = {
    "frontal": ("Precentral", "Frontal", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus",
                "Paracentral_Lobule"),
    "parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus"),
    "temporal": ("Temporal", "Heschl", "Hippocampus", "ParaHippocampal", "Amygdala", "Fusiform"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital"),
    "cingulate and insula": ("Cingulum", "Insula"),
    "deep grey matter": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum", "Vermis"),
}


def aal_names(table: Path = AAL_TABLE) -> dict[int, str]:
    """AAL label value -> region name, from a table of `value name code` lines."""
    names = {}
    for line in table.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def merge_aal_into_lobes(aal: np.ndarray, table: Path = AAL_TABLE) -> tuple[np.ndarray, list[str]]:
    """AAL labels -> lobe labels (uint8, 0 = outside the atlas) and the names ["background", *LOBES]."""
    names = aal_names(table)
    lookup = np.zeros(max(int(aal.max()), max(names)) + 1, dtype=np.uint8)
    for value, name in names.items():
        for label, prefixes in enumerate(LOBES.values(), start=1):
            if name.startswith(prefixes):
                lookup[value] = label
    return lookup[np.asarray(aal, dtype=np.int64)], ["background", *LOBES]
