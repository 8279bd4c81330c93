"""The task families a head serves, named once: every list of tasks (the card's check, fitting's dispatch, the
command line's choices) comes from here. Imports nothing, so the command line reads it without torch."""
from __future__ import annotations

SEGMENTATION = "segmentation"  # a label per voxel
CLASSIFICATION = "classification"  # a class per subject (an MLP on pooled slice tokens)
REGRESSION = "regression"  # a number per subject
SURVIVAL = "survival"  # a log-risk per subject (Cox)
KNN = "knn"  # a class per subject by its nearest training subjects

SUBJECT_TASKS: tuple[str, ...] = (CLASSIFICATION, REGRESSION, SURVIVAL, KNN)
TASKS: tuple[str, ...] = (SEGMENTATION, *SUBJECT_TASKS)
CLASS_TASKS: tuple[str, ...] = (CLASSIFICATION, KNN)  # subject tasks that predict one of named classes

# The head modules a segmentation head may use (each registers itself in `segmentation.py`; a test checks the two
# agree). Written here too because the command line offers them without importing torch.
SEGMENTATION_KINDS: tuple[str, ...] = ("linear", "mlp", "decoder")

UNKNOWN_TASK = f"unknown task; use {', '.join(TASKS[:-1])} or {TASKS[-1]}"  # the problem sentence
