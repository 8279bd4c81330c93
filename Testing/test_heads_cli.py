"""The head commands end to end: make-cases -> fit-head (segmentation) -> evaluate -> segment -> predict.

Tissue cases (3 training, 2 test, 3 mm), the fixture encoder (random weights) at 224 px on every slice with
blocks 0-2, guided upsampling and a linear head. Measured test Dice: grey matter 0.75, white matter 0.76, CSF
0.14 (thin, barely learned from 16-mm patches of random features), mean 0.55 (0.46 with bilinear upsampling);
asserted above 0.45, and clearly above labelling the brain with one class.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from BrainDINOLib import read_volume
from BrainDINOLib.cli import main
from BrainDINOLib.heads import load_head
from BrainDINOLib.heads.metrics import dice_per_class
from BrainDINOLib.threads import torch_threads


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, teacher_checkpoint):
    root = tmp_path_factory.mktemp("cli")
    model = ["--model", str(teacher_checkpoint), "--device", "cpu", "--cache-dir", str(root / "cache")]
    with torch_threads(1):
        assert main(["make-cases", "--task", "tissue", "--out", str(root / "cases"), "--train", "3", "--test", "2",
                     "--spacing", "3"]) == 0
        assert main(["fit-head", "--task", "segmentation", "--manifest", str(root / "cases" / "cases.csv"),
                     "--out", str(root / "tissue.safetensors"), "--classes", str(root / "cases" / "classes.txt"),
                     "--image-size", "224", "--layers", "0,1,2", "--epochs", "40", "--val-fraction", "0",
                     *model]) == 0
    return root, model


def test_fit_head_writes_head_report_and_test_metrics(fitted):
    root, _ = fitted
    head = load_head(root / "tissue.safetensors")
    assert head.card.task == "segmentation" and head.card.layers == (0, 1, 2)
    assert head.card.class_names == ["background", "CSF", "grey matter", "white matter"]
    report = root / "tissue_report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["cases"] == 2
    print("segmentation test metrics", metrics["mean_dice"], metrics["dice_per_class"])
    assert metrics["mean_dice"] > 0.45, metrics
    assert (report / "metrics.csv").read_text().startswith("metric,value")
    assert (report / "learning_curves.png").stat().st_size > 1000
    assert (report / "predictions.csv").exists()


def test_segment_and_predict_write_label_volumes_on_the_input_grid(fitted):
    root, model = fitted
    image = sorted((root / "cases").glob("*-0004_T1.nii.gz"))[0]
    truth = read_volume(sorted((root / "cases").glob("*-0004_labels.nii.gz"))[0]).array
    with torch_threads(1):
        assert main(["segment", str(root / "tissue.safetensors"), str(image), "--out", str(root / "seg.nii.gz"),
                     *model]) == 0
        assert main(["predict", str(root / "tissue.safetensors"), str(image), str(image), "--out",
                     str(root / "many"), *model]) == 0
    segmentation = read_volume(root / "seg.nii.gz")
    source = read_volume(image)
    assert segmentation.stored == source.stored and segmentation.array.shape == source.array.shape
    classes = [1, 2, 3]
    mean_dice = np.mean(list(dice_per_class(segmentation.array.astype(int), truth, classes).values()))
    # Chance level: the best mean Dice of labelling the whole brain with one tissue class.
    brain = truth > 0
    constant = max(np.mean([dice_per_class(brain * c, truth, classes).get(k, 0.0) for k in classes]) for c in classes)
    print("segment: mean Dice", mean_dice, "constant labelling", constant)
    assert mean_dice > constant + 0.08, (mean_dice, constant)
    assert len(list((root / "many").glob("*_seg.nii.gz"))) == 1  # the same volume twice -> one file name


def test_evaluate_command_and_bad_inputs(fitted, capsys):
    root, model = fitted
    with torch_threads(1):
        assert main(["evaluate", str(root / "tissue.safetensors"), "--manifest", str(root / "cases" / "cases.csv"),
                     "--report", str(root / "eval"), *model]) == 0
    assert json.loads((root / "eval" / "metrics.json").read_text())["cases"] == 2
    volume = str(next((root / "cases").glob("*_T1.nii.gz")))
    assert main(["predict", str(root / "cases" / "cases.csv"), volume, *model]) == 2
    assert "not a readable head file" in capsys.readouterr().err
    other = root / "other.pth"
    import torch
    state = torch.load(model[1], weights_only=True)
    state["iteration"] = 1  # same weights, different file -> a different encoder id
    torch.save(state, other)
    assert main(["segment", str(root / "tissue.safetensors"), volume, "--out", str(root / "x.nii.gz"),
                 "--model", str(other), "--device", "cpu", "--no-cache"]) == 2
    assert "was fitted on" in capsys.readouterr().err
