"""Every registered head kind saves and loads bit-identically (as timm tests every registered model); the task
families are named once and agree with the registry; the fit-head options land in the config's fields.

Each kind is built small (a few channels, a few classes) with random weights and buffers, so the whole file
runs in about a second.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch

from BrainDINOLib.cli import build_parser
from BrainDINOLib.commands.heads import _fit_config
from BrainDINOLib.heads import FitConfig, Head, HeadCard, HeadTrainingConfig, load_head, save_head
from BrainDINOLib.preprocessing import PreprocessConfig
from BrainDINOLib.heads.card import make_classes
from BrainDINOLib.heads.registry import create_head_module, head_kinds, predictor, tasks_of_kind
from BrainDINOLib.heads.storage import module_state_equal
from BrainDINOLib.heads.tasks import CLASS_TASKS, SEGMENTATION, SEGMENTATION_KINDS, TASKS

# Small constructor arguments per registered kind; a new kind needs an entry here (the test below says so).
ARGUMENTS = {
    "linear": {"in_channels": 6, "num_classes": 3},
    "mlp": {"in_channels": 6, "num_classes": 3},
    "decoder": {"in_channels": 6, "num_classes": 3},
    "subject-mlp": {"token_dim": 8, "out_dim": 3, "modalities": 2, "pooling": "attention", "hidden": 16},
    "knn": {"feature_dim": 16, "num_items": 6, "num_classes": 3, "k": 3},
}


def _randomised(module: torch.nn.Module, classes: int) -> torch.nn.Module:
    """Every tensor random (running statistics and standardisation too), so a lost buffer cannot go unnoticed."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("labels"):  # kNN: the stored subjects' classes
                tensor.copy_(torch.randint(classes, tensor.shape, generator=generator))
    return module.eval()


def _example_input(kind: str):
    generator = torch.Generator().manual_seed(1)
    if SEGMENTATION in tasks_of_kind(kind):
        return torch.randn(2, 6, 4, 5, generator=generator)  # [slices, channels, h, w]
    modalities = ARGUMENTS[kind].get("modalities", 2)
    return [[torch.randn(5 + s, 8, generator=generator) for _ in range(modalities)] for s in range(3)]  # bags


@pytest.mark.parametrize("kind", head_kinds())
def test_every_head_kind_round_trips_through_its_file(kind, tmp_path):
    assert kind in ARGUMENTS, f"give the new head kind {kind!r} small constructor arguments in ARGUMENTS"
    task = tasks_of_kind(kind)[0]
    arguments = ARGUMENTS[kind]
    module = _randomised(create_head_module(kind, **arguments), 3)
    values = [0, 1, 4] if task == SEGMENTATION else [0, 1, 2]
    card = HeadCard(task=task, kind=kind, encoder_id="demo:0123abcd", classes=make_classes(values),
                    layers=(2, 5) if task == SEGMENTATION else (), modalities=() if task == SEGMENTATION else
                    ("image_T1", "image_FLAIR"), preprocessing=PreprocessConfig(margin_mm=6.0), module=dict(arguments),
                    extra={"target_mean": 3.5}, metrics={"validation": {"accuracy": 0.75}}, description=kind)
    path = save_head(Head(card, module), tmp_path / f"{kind}.safetensors")

    loaded = load_head(path)
    assert loaded.card == card and type(loaded.module) is type(module)
    assert module_state_equal(loaded.module, module) and not loaded.module.training
    example = _example_input(kind)
    with torch.no_grad():
        assert torch.equal(loaded.module(example), module(example))
    assert (tmp_path / f"{kind}.json").read_text().strip() == card.to_json()


def test_task_families_are_named_once_and_served():
    assert TASKS == ("segmentation", "classification", "regression", "survival", "knn")
    assert sorted(SEGMENTATION_KINDS) == head_kinds(SEGMENTATION)  # the command line's list, without torch
    for task in TASKS:
        assert head_kinds(task), f"no head kind serves {task}"
        assert callable(predictor(task))
    assert set(CLASS_TASKS) < set(TASKS)
    with pytest.raises(ValueError, match="unknown head task"):
        HeadCard(task="grading", kind="linear", encoder_id="x")


def _fit_head_arguments(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["fit-head", "--task", "classification", "--manifest", "m.csv",
                                      "--out", "h.safetensors", *options])


def test_fit_head_defaults_are_the_configs_and_each_option_sets_its_field():
    assert _fit_config(_fit_head_arguments(), "classification") == FitConfig(task="classification")
    config = _fit_config(_fit_head_arguments("--epochs", "7", "--lr", "0.5", "--batch", "3", "--patience", "4",
                                             "--seed", "9", "--hidden", "0", "--pooling", "attention",
                                             "--folds", "3", "--val-fraction", "0.1", "--label-fraction", "0.5",
                                             "--image-columns", "image_T1,image_FLAIR", "--label-column", "grade",
                                             "--batch-size", "2"), "classification")
    assert config.training == replace(HeadTrainingConfig(), max_epochs=7, learning_rate=0.5, batch_size=3,
                                      patience=4, seed=9)
    assert config == FitConfig(task="classification", hidden=0, pooling="attention", folds=3, val_fraction=0.1,
                               label_fraction=0.5, image_columns=("image_T1", "image_FLAIR"), label_column="grade",
                               seed=9, training=config.training)
