"""The error contract held against a corpus of hostile inputs (issue 12).

Every case is something a real user could hand `braindino`: damaged or strange volumes, DICOM series with
gaps, broken checkpoints and heads, manifests with the mistakes spreadsheets make, outputs that point at inputs,
a full disk, a read-only folder, mistyped options. For each one: exit code 2, exactly one line on stderr that
names the problem, no traceback, every input file byte-identical afterwards, and nothing at the output path.

The corpus is generated here from the bundled sample (a 4 mm copy of Colin27) and the fixture checkpoint. Most
cases fail before any model runs (in-process calls of `braindino`'s `main`); a few run the tiny fixture encoder at
64 px; a handful run as real subprocesses. The last tests check what must not fail: a DICOM series with one
missing slice, a damaged cache entry, stale temporary files, negative coordinates, the umask.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_T1
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from volume_factories import downsampled, write_dicom_series

from BrainDINOLib.atomic import TEMP_MARKER, atomic_path, remove_stale_temp_files
from BrainDINOLib.checkpoints import CARD_KEY, read_checkpoint
from BrainDINOLib.cli import build_parser, join_negative_values, main
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.heads import Head, HeadCard, save_head
from BrainDINOLib.heads.card import make_classes
from BrainDINOLib.heads.storage import HEAD_CARD_KEY
from BrainDINOLib.heads.segmentation import make_segmentation_module
from BrainDINOLib.heads.subject import SubjectHead
from BrainDINOLib.slices import PreprocessConfig
from BrainDINOLib.volume import read_volume, write_volume

IMAGE_SIZE = "64"  # 4 x 4 patches with the patch-16 fixture: the few cases that run a model stay cheap


# ---- the corpus ------------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """Every input of every case lives under `root`, which is compared byte for byte after each case."""

    root: Path
    volume: Path  # a good 4 mm T1 (.nii.gz)
    model: Path  # a copy of the fixture checkpoint
    files: dict[str, Path] = field(default_factory=dict)  # every other input, by name

    def __getitem__(self, name: str) -> Path:
        return self.files[name]

    def model_options(self, image_size: bool = True) -> list:
        return ["--model", self.model, "--device", "cpu", "--no-cache",
                *(["--image-size", IMAGE_SIZE] if image_size else [])]


def snapshot(root: Path) -> dict[str, str]:
    """Path -> content hash (files), link target (symlinks) or "folder", for everything under `root`."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            state[key] = "folder"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _nifti_with(path: Path, source: Path, offset: int, fmt: str, value) -> Path:
    """A copy of the uncompressed NIfTI `source` with one header field overwritten (struct format, byte offset)."""
    data = bytearray(source.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _bad_volumes(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir()
    ramp = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    with_nan, with_inf = ramp.copy(), ramp.copy()
    with_nan[2, 3, 4] = np.nan
    with_inf[1, 1, 1] = np.inf
    plain = _write(sitk.GetImageFromArray(ramp), folder / "plain.nii")
    complex_image = sitk.GetImageFromArray((ramp + 1j * ramp).astype(np.complex64))
    mha = _write(sitk.GetImageFromArray(ramp), folder / "zero_spacing.mha")
    mha.write_bytes(mha.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 0 1 1"))
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:2000])
    truncated_nii = _write(sitk.ReadImage(str(good)), folder / "full.nii")
    cut = folder / "truncated.nii"
    cut.write_bytes(truncated_nii.read_bytes()[:50000])
    truncated_nii.unlink()
    (folder / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream at all" * 10)
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "notes.mha").write_text("these are notes, not an image")
    (folder / "empty_dicom").mkdir()
    (folder / "garbage_dicom").mkdir()
    (folder / "garbage_dicom" / "IM0001.dcm").write_bytes(b"DICM" * 100)
    (folder / "folder.nii.gz").mkdir()
    head = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 10, 10)).astype(np.float32) * 100)
    head.SetSpacing((1.0, 1.0, 2.0))
    write_dicom_series(head, folder / "dicom_gap", "LPS")
    for k in (4, 5, 6, 7):  # four slices missing in a row: too many to interpolate honestly
        (folder / "dicom_gap" / f"slice{k:04d}.dcm").unlink()
    write_dicom_series(head, folder / "dicom_duplicate", "LPS", shift_mm={5: (0, 0, -2.0)})
    write_dicom_series(head, folder / "dicom_sheared", "LPS", shift_mm={k: (0.5 * k, 0, 0) for k in range(12)})
    write_dicom_series(head, folder / "dicom_uneven", "LPS", shift_mm={k: (0, 0, 0.7) for k in range(6, 12)})
    return {
        "missing file": folder / "missing.nii.gz",
        "empty file": folder / "empty.nii.gz",
        "corrupt gzip": folder / "corrupt.nii.gz",
        "truncated gzip": truncated,
        "truncated NIfTI": cut,
        "text as MHA": folder / "notes.mha",
        "2-D image": _write(sitk.GetImageFromArray(ramp[0]), folder / "plane.nii.gz"),
        "single slice": _write(sitk.GetImageFromArray(ramp[:1]), folder / "one.nii.gz"),
        "NaN in NIfTI": _write(sitk.GetImageFromArray(with_nan), folder / "nan.nii"),
        "Inf in NIfTI.gz": _write(sitk.GetImageFromArray(with_inf), folder / "inf.nii.gz"),
        "NaN in NRRD": _write(sitk.GetImageFromArray(with_nan), folder / "nan.nrrd"),
        "Inf in MHA": _write(sitk.GetImageFromArray(with_inf), folder / "inf.mha"),
        "constant": _write(sitk.GetImageFromArray(np.full((6, 7, 8), 3.0, np.float32)), folder / "flat.nii.gz"),
        "RGB": _write(sitk.GetImageFromArray(np.zeros((6, 7, 8, 3), np.uint8), isVector=True), folder / "rgb.nrrd"),
        "complex NIfTI": _write(complex_image, folder / "complex.nii.gz"),
        "complex NRRD": _write(complex_image, folder / "complex.nrrd"),
        "voxel size 0": _nifti_with(folder / "zero.nii", plain, 80, "<f", 0.0),
        "voxel size NaN": _nifti_with(folder / "nan_spacing.nii", plain, 84, "<f", float("nan")),
        "voxel size negative": _nifti_with(folder / "negative.nii", plain, 88, "<f", -2.0),
        "voxel size 0 in MHA": mha,
        "empty DICOM folder": folder / "empty_dicom",
        "garbage DICOM folder": folder / "garbage_dicom",
        "empty folder named .nii.gz": folder / "folder.nii.gz",
        "DICOM: 4 slices missing": folder / "dicom_gap",
        "DICOM: two slices at one position": folder / "dicom_duplicate",
        "DICOM: sheared slices": folder / "dicom_sheared",
        "DICOM: uneven spacing": folder / "dicom_uneven",
    }


BAD_VOLUMES = {
    "missing file": "no such file or folder",
    "empty file": "not a NIfTI file",
    "corrupt gzip": "truncated or corrupt gzip stream",
    "truncated gzip": "truncated or corrupt gzip stream",
    "truncated NIfTI": "truncated: ",
    "text as MHA": "cannot read as an image",
    "2-D image": "2-D image",
    "single slice": "single slice",
    "NaN in NIfTI": "1 NaN or infinite voxels",
    "Inf in NIfTI.gz": "1 NaN or infinite voxels",
    "NaN in NRRD": "1 NaN or infinite voxels",
    "Inf in MHA": "1 NaN or infinite voxels",
    "constant": "is constant",
    "RGB": "3 components per voxel",
    "complex NIfTI": "complex voxels",
    "complex NRRD": "complex voxels",
    "voxel size 0": "voxel size in the header is 0 x",
    "voxel size NaN": "voxel size in the header is 1 x nan",
    "voxel size negative": "voxel size in the header is 1 x 1 x -2 mm",
    "voxel size 0 in MHA": "cannot read as an image",
    "empty DICOM folder": "no DICOM series found",
    "garbage DICOM folder": "no DICOM series found",
    "empty folder named .nii.gz": "no DICOM series found",
    "DICOM: 4 slices missing": "4 slices in a row are missing between slice0003.dcm and slice0008.dcm",
    "DICOM: two slices at one position": "lie at the same position (8 mm along the slice axis)",
    "DICOM: sheared slices": "shifted sideways by up to 5.5 mm",
    "DICOM: uneven spacing": "slice spacing varies from 2 to 2.7 mm",
}


def _checkpoints(folder: Path, teacher: Path) -> dict[str, Path]:
    folder.mkdir()
    state = torch.load(teacher, weights_only=True)
    missing = {"teacher": {k: v for k, v in state["teacher"].items() if k != "backbone.blocks.1.norm1.weight"}}
    reshaped = {"teacher": dict(state["teacher"])}
    reshaped["teacher"]["backbone.blocks.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    torch.save(missing, folder / "missing_tensor.pth")
    torch.save(reshaped, folder / "mis_shaped.pth")
    torch.save({"weight": torch.zeros(2)}, folder / "unknown_kind.pth")
    torch.save({"teacher": {"backbone.x": torch.zeros(1)}, "hook": Path("x")}, folder / "pickled_object.pth")
    (folder / "truncated.pth").write_bytes(teacher.read_bytes()[:100000])
    (folder / "random.pth").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "a_folder.pth").mkdir()
    demo = Path(__file__).resolve().parents[1] / "BrainDINOLib" / "models" / "demo.safetensors"
    tensors = load_file(str(demo))
    save_file(tensors, str(folder / "card_not_json.safetensors"), metadata={CARD_KEY: "{not json"})
    with safe_open(str(demo), framework="pt") as handle:
        card = json.loads(handle.metadata()[CARD_KEY])
    card["architecture"]["family"] = "resnet"
    save_file(tensors, str(folder / "card_family.safetensors"), metadata={CARD_KEY: json.dumps(card)})
    return {name: folder / name for name in os.listdir(folder)}


CHECKPOINTS = {
    "missing.pth": "no such checkpoint file",
    "a_folder.pth": "is a folder, not a checkpoint file",
    "random.pth": "not a readable PyTorch checkpoint",
    "truncated.pth": "not a readable PyTorch checkpoint",
    "pickled_object.pth": "refused: the checkpoint holds pickled objects",
    "empty.safetensors": "not a readable safetensors file",
    "card_not_json.safetensors": "the model card in the file is not valid (JSONDecodeError",
    "card_family.safetensors": "unknown architecture family 'resnet'",
    "unknown_kind.pth": "unknown checkpoint kind",
    "missing_tensor.pth": "missing tensor(s) blocks.1.norm1.weight",
    "mis_shaped.pth": "tensor blocks.1.mlp.fc1.weight has shape (3, 3)",
}


def _heads(folder: Path, model: Path) -> dict[str, Path]:
    """Heads fitted on nothing (random weights), but made exactly as `fit-head` saves them."""
    folder.mkdir()
    checkpoint = read_checkpoint(model)
    dim = checkpoint.architecture.embed_dim
    preprocessing = PreprocessConfig().to_dict()
    module, arguments = make_segmentation_module("linear", dim, 3)
    segmentation = HeadCard(task="segmentation", kind="linear", encoder_id=checkpoint.model_id,
                            classes=make_classes([0, 1, 2]), preprocessing=preprocessing, module=arguments)
    save_head(Head(segmentation, module), folder / "segmentation.safetensors")
    subject_arguments = {"token_dim": 2 * dim, "out_dim": 2, "modalities": 2, "pooling": "mean", "hidden": 0}
    classification = HeadCard(task="classification", kind="subject-mlp", encoder_id=checkpoint.model_id,
                              classes=make_classes([0, 1], ["a", "b"]), pooling="mean",
                              modalities=("image_t1", "image_flair"), preprocessing=preprocessing,
                              module=subject_arguments)
    save_head(Head(classification, SubjectHead(**subject_arguments)), folder / "classification.safetensors")
    state = load_file(str(folder / "segmentation.safetensors"))
    card = json.loads(segmentation.to_json())
    save_file(state, str(folder / "card_not_json.safetensors"), metadata={HEAD_CARD_KEY: "{oops"})
    save_file(state, str(folder / "card_task.safetensors"), metadata={HEAD_CARD_KEY: json.dumps({**card, "task": "x"})})
    save_file(state, str(folder / "no_card.safetensors"))
    bigger = {k: torch.zeros(4, *v.shape[1:]) if v.shape and v.shape[0] == 3 else v for k, v in state.items()}
    save_file(bigger, str(folder / "mis_shaped.safetensors"), metadata={HEAD_CARD_KEY: json.dumps(card)})
    (folder / "text.safetensors").write_bytes((folder / "segmentation.safetensors").read_bytes()[:40])
    return {name: folder / name for name in os.listdir(folder)}


MANIFEST_HEADERS = {"classification": "case,split,image,label", "regression": "case,split,image,target",
                    "survival": "case,split,image,time,event", "segmentation": "case,split,image,label"}


def _manifests(folder: Path, images: list[str], labels: str) -> dict[str, Path]:
    """Manifests of four cases (a, b, c train; d test) on four distinct copies of the good volume."""
    folder.mkdir()

    def table(task: str, values: list[str], splits=("train", "train", "train", "test"),
              header: str | None = None) -> str:
        lines = [header or MANIFEST_HEADERS[task]]
        lines += [",".join(row) for row in zip("abcd", splits, images, values)]
        return "\n".join(lines) + "\n"

    texts = {
        "empty": "",
        "header_only": MANIFEST_HEADERS["classification"] + "\n",
        "semicolons": table("classification", ["x", "y", "x", "y"]).replace(",", ";"),
        "tabs": table("classification", ["x", "y", "x", "y"]).replace(",", "\t"),
        "no_image_column": table("classification", ["x", "y", "x", "y"], header="case,split,picture,label"),
        "no_label_column": table("classification", ["x", "y", "x", "y"], header="case,split,image,diagnosis"),
        "one_class": table("classification", ["x", "x", "x", "x"]),
        "empty_label": table("classification", ["x", "", "y", "x"]),
        "nan_label": table("classification", ["x", "y", "NaN", "x"]),
        "unknown_test_class": table("classification", ["x", "y", "x", "z"]),
        "target_inf": table("regression", ["1", "inf", "2", "3"]),
        "target_nan": table("regression", ["1", "2", "NaN", "3"]),
        "target_text": table("regression", ["1", "2", "old", "3"]),
        "target_constant": table("regression", ["5", "5", "5", "6"]),
        "event_two": table("survival", ["10,1", "20,2", "30,0", "5,1"]),
        "time_negative": table("survival", ["10,1", "-20,0", "30,0", "5,1"]),
        "no_events": table("survival", ["10,0", "20,0", "30,0", "5,1"]),
        "no_comparable_pair": table("survival", ["10,0", "20,0", "30,1", "5,1"]),
        "no_time_column": table("survival", ["10,1", "20,0", "30,0", "5,1"], header="case,split,image,days,event"),
        "split_typo": table("classification", ["x", "y", "x", "y"], splits=("train", "train", "tset", "test")),
        "all_test": table("classification", ["x", "y", "x", "y"], splits=("test",) * 4),
        "missing_image": table("classification", ["x", "y", "x", "y"]).replace(images[1], "../images/nope.nii.gz"),
        "repeated_column": table("classification", ["x", "y", "x", "y"], header="case,split,image,image"),
        "segmentation": table("segmentation", [labels] * 4),
        "segmentation_missing_label": table("segmentation", [labels, "../images/nope_labels.nii.gz", labels, labels]),
        "classification": table("classification", ["x", "y", "x", "y"]),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.csv"
        paths[name].write_text(text)
    paths["latin1"] = folder / "latin1.csv"
    paths["latin1"].write_bytes(table("classification", ["x", "y", "x", "y"]).replace("c,train", "José,train")
                                .encode("latin-1"))
    paths["classes_latin1"] = folder / "classes_latin1.txt"
    paths["classes_latin1"].write_bytes("fond\nœdème\n".encode("cp1252"))
    paths["report_folder_with_files"] = folder / "holiday_photos"
    paths["report_folder_with_files"].mkdir()
    (paths["report_folder_with_files"] / "beach.jpg").write_bytes(b"\xff\xd8")
    return paths


def _stores(folder: Path, manifest: Path, model: Path) -> dict[str, Path]:
    """Feature stores of the classification manifest (its four images) made by embed-cohort at 64 px: with the
    blocks segmentation reads and with none; and folders that are not stores."""
    folder.mkdir()
    stores = {"store": folder / "store", "store without blocks": folder / "no_blocks"}
    for name, extra in (("store", []), ("store without blocks", ["--layers", ""])):
        assert main(["embed-cohort", str(manifest), "--out", str(stores[name]), "--model", str(model), "--device",
                     "cpu", "--image-size", IMAGE_SIZE, "--workers", "0", *extra]) == 0
    stores["store not a store"] = folder / "holiday_photos"
    stores["store not a store"].mkdir()
    (stores["store not a store"] / "beach.jpg").write_bytes(b"\xff\xd8")
    stores["store index not JSON"] = folder / "index_not_json"
    stores["store index not JSON"].mkdir()
    (stores["store index not JSON"] / "index.json").write_text("{ half an index")
    return stores


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, teacher_checkpoint) -> Corpus:
    root = tmp_path_factory.mktemp("hostile") / "inputs"
    (root / "images").mkdir(parents=True)
    volume = _write(downsampled(SAMPLE_T1, 4.0), root / "images" / "t1.nii.gz")
    images = []
    for n in range(4):  # distinct files, so that no image is shared between training and test
        shutil.copy(volume, root / "images" / f"t1_{n}.nii.gz")
        images.append(f"../images/t1_{n}.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(volume)))
    labels = sitk.GetImageFromArray((array > np.percentile(array, 60)).astype(np.uint8) +
                                    (array > np.percentile(array, 85)).astype(np.uint8))
    labels.CopyInformation(sitk.ReadImage(str(volume)))
    _write(labels, root / "images" / "labels.nii.gz")
    model = root / "teacher_checkpoint.pth"
    shutil.copy(teacher_checkpoint, model)
    corpus = Corpus(root, volume, model)
    corpus.files.update(_bad_volumes(root / "bad", volume))
    groups = {"checkpoint": _checkpoints(root / "checkpoints", teacher_checkpoint),
              "head": _heads(root / "heads", model),
              "manifest": _manifests(root / "manifests", images, "../images/labels.nii.gz")}
    corpus.files.update({f"{group} {name}": path for group, files in groups.items() for name, path in files.items()})
    corpus.files["checkpoint missing.pth"] = root / "checkpoints" / "missing.pth"
    links = root / "links"
    links.mkdir()
    (links / "symlink.nii.gz").symlink_to(volume)
    os.link(volume, links / "hardlink.nii.gz")
    (links / "a_file").write_text("not a folder")
    (links / "folder.nii.gz").mkdir()
    encoder_copy = root / "encoder.safetensors"
    shutil.copy(Path(__file__).resolve().parents[1] / "BrainDINOLib" / "models" / "demo.safetensors", encoder_copy)
    corpus.files["encoder.safetensors"] = encoder_copy
    corpus.files.update(_stores(root / "stores", corpus["manifest classification"], model))
    return corpus


@pytest.fixture(scope="module")
def untouched(corpus) -> dict[str, str]:
    return snapshot(corpus.root)


# ---- the contract ------------------------------------------------------------------------------------------------

def run_in_process(argv: list, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_contract(code: int, stderr: str, problem: str, corpus: Corpus, untouched: dict, output: Path | None):
    assert code == 2, stderr
    assert stderr.endswith("\n") and len(stderr.splitlines()) == 1, repr(stderr)
    assert "Traceback" not in stderr and "error:" in stderr
    assert problem in stderr, stderr
    assert snapshot(corpus.root) == untouched, "an input changed"
    if output is not None:
        assert not output.exists() or output.is_dir() and not any(output.iterdir()), f"{output} was written"
        assert not list(output.parent.glob(f".*{TEMP_MARKER}*")), "a temporary file was left behind"


# -- volumes x commands: every map command and embed, before any model runs

VOLUME_COMMANDS: dict[str, Callable[[Corpus, Path, Path], list]] = {
    "embed": lambda c, v, out: ["embed", v, "--out", out / "features.safetensors", *c.model_options()],
    "pca": lambda c, v, out: ["pca", v, "--out", out / "pca.nii.gz", "--png", out / "pca.png", *c.model_options()],
    "similarity": lambda c, v, out: ["similarity", v, "--point-ras", "-24,4,2", "--out", out / "sim.nrrd",
                                     *c.model_options()],
    "attention": lambda c, v, out: ["attention", v, "--out", out / "attention.mha", *c.model_options()],
    "cluster": lambda c, v, out: ["cluster", v, "-k", "4", "--out", out / "clusters.nii", *c.model_options()],
}


@pytest.mark.parametrize("command", VOLUME_COMMANDS)
@pytest.mark.parametrize("name", BAD_VOLUMES)
def test_bad_volume(corpus, untouched, tmp_path, capsys, name, command):
    code, stderr = run_in_process(VOLUME_COMMANDS[command](corpus, corpus[name], tmp_path), capsys)
    assert_contract(code, stderr, BAD_VOLUMES[name], corpus, untouched, tmp_path)
    assert stderr.startswith(f"braindino: error: {corpus[name]}: ")


@pytest.mark.parametrize("name", ["missing file", "NaN in NIfTI", "DICOM: 4 slices missing"])
@pytest.mark.parametrize("command", ["segment", "predict"])
def test_bad_volume_for_a_head(corpus, untouched, tmp_path, capsys, name, command):
    code, stderr = run_in_process([command, corpus["head segmentation.safetensors"], corpus[name], "--out",
                                   tmp_path / "labels.nii.gz", *corpus.model_options(image_size=False)], capsys)
    assert_contract(code, stderr, BAD_VOLUMES[name], corpus, untouched, tmp_path)
    assert stderr.startswith(f"braindino: error: {corpus[name]}: ")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_bad_checkpoint(corpus, untouched, tmp_path, capsys, name):
    argv = ["embed", corpus.volume, "--out", tmp_path / "f.safetensors", *corpus.model_options()]
    argv[argv.index(corpus.model)] = corpus[f"checkpoint {name}"]
    code, stderr = run_in_process(argv, capsys)
    assert_contract(code, stderr, CHECKPOINTS[name], corpus, untouched, tmp_path)


# -- outputs that would destroy an input, or cannot be written

SAME = "is the same file as the input"


def _model(c: Corpus) -> list:
    return c.model_options()


def _head_model(c: Corpus) -> list:
    return c.model_options(image_size=False)


# name -> (command line from the corpus and an output folder, what the one line must say)
OUTPUT_CASES: dict[str, tuple[Callable[[Corpus, Path], list], str]] = {
    "pca over its input": (lambda c, out: ["pca", c.volume, "--out", c.volume, *_model(c)], SAME),
    "pca over a symlink to its input": (
        lambda c, out: ["pca", c.volume, "--out", c.root / "links" / "symlink.nii.gz", *_model(c)], SAME),
    "pca over a hard link to its input": (
        lambda c, out: ["pca", c.volume, "--out", c.root / "links" / "hardlink.nii.gz", *_model(c)], SAME),
    "pca components over its input": (
        lambda c, out: ["pca", c.volume, "--out", out / "p.nii.gz", "--components-out", c.volume, *_model(c)], SAME),
    "embed over its input": (lambda c, out: ["embed", c.volume, "--out", c.volume, *_model(c)], SAME),
    "embed over the model": (lambda c, out: ["embed", c.volume, "--out", c.model, *_model(c)], SAME),
    "similarity over its target": (
        lambda c, out: ["similarity", c.volume, "--point-ras=0,0,0", "--target", c.root / "images" / "t1_1.nii.gz",
                        "--out", c.root / "images" / "t1_1.nii.gz", *_model(c)], SAME),
    "attention heads over a hard link to its input": (
        lambda c, out: ["attention", c.volume, "--out", out / "a.nii.gz", "--heads-out",
                        c.root / "links" / "hardlink.nii.gz", *_model(c)], SAME),
    "cluster over its input": (lambda c, out: ["cluster", c.volume, "--out", c.volume, *_model(c)], SAME),
    "segment over its input": (
        lambda c, out: ["segment", c["head segmentation.safetensors"], c.volume, "--out", c.volume, *_head_model(c)],
        SAME),
    "predict over the head": (
        lambda c, out: ["predict", c["head segmentation.safetensors"], c.volume, "--out",
                        c["head segmentation.safetensors"], *_head_model(c)], SAME),
    "fit-head over the encoder": (
        lambda c, out: ["fit-head", "--task", "classification", "--manifest", c["manifest classification"], "--out",
                        c["encoder.safetensors"], "--model", c["encoder.safetensors"], "--no-cache"], SAME),
    "fit-head report over the manifest": (
        lambda c, out: ["fit-head", "--task", "classification", "--manifest", c["manifest classification"], "--out",
                        out / "h.safetensors", "--report", c["manifest classification"], *_model(c)],
        "exists and is not a folder"),
    "evaluate report over the manifest": (
        lambda c, out: ["evaluate", c["head segmentation.safetensors"], "--manifest", c["manifest segmentation"],
                        "--report", c["manifest segmentation"], *_head_model(c)], "exists and is not a folder"),
    "report among other files": (
        lambda c, out: ["evaluate", c["head segmentation.safetensors"], "--manifest", c["manifest segmentation"],
                        "--report", c["manifest report_folder_with_files"], *_head_model(c)],
        "is a folder of other files"),
    "prepare-slices into its input": (
        lambda c, out: ["prepare-slices", c.volume, "--output", c.volume], "exists and is not a folder"),
    "output is a folder": (
        lambda c, out: ["pca", c.volume, "--out", c.root / "links" / "folder.nii.gz", *_model(c)], "is a folder"),
    "output below a file": (
        lambda c, out: ["pca", c.volume, "--out", c.root / "links" / "a_file" / "pca.nii.gz", *_model(c)],
        "a part of the path is not a folder"),
}


@pytest.fixture
def small_mount(tmp_path):
    """A tiny tmpfs (root only): `small_mount(options)` mounts one and returns its path; unmounted afterwards."""
    mounted = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
        point = tmp_path / f"mount{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def _fill(folder: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave_bytes))


@pytest.mark.parametrize("command, output", [("pca", "pca.nii.gz"), ("attention", "attention.nrrd"),
                                             ("embed", "features.safetensors")])
def test_full_disk_leaves_nothing_and_exits_2(corpus, untouched, small_mount, capsys, command, output):
    disk = small_mount("size=256k")
    _fill(disk, 12 * 1024)
    target = disk / "maps" / output
    code, stderr = run_in_process([command, corpus.volume, "--out", target, *corpus.model_options()], capsys)
    assert_contract(code, stderr, f"{target}: cannot be written: the disk is full; nothing was written", corpus,
                    untouched, target)


def test_read_only_location_is_refused_before_any_work(corpus, untouched, small_mount, tmp_path, capsys):
    if os.geteuid() == 0:
        place = small_mount("ro,size=64k")
        problem = "cannot be written: the location is read-only"
    else:
        place = tmp_path / "locked"
        place.mkdir(mode=0o555)
        problem = "cannot be written: permission denied"
    target = place / "sub" / "pca.nii.gz"
    code, stderr = run_in_process(["pca", corpus.volume, "--out", target, *corpus.model_options()], capsys)
    assert_contract(code, stderr, f"{target}: {problem}", corpus, untouched, target)


# -- heads

def _segment(c: Corpus, out: Path, head: str) -> list:
    return ["segment", c[f"head {head}"], c.volume, "--out", out / "labels.nii.gz", *_head_model(c)]


def _evaluate(c: Corpus, out: Path, head: str, manifest: str, *extra: str) -> list:
    return ["evaluate", c[f"head {head}"], "--manifest", c[f"manifest {manifest}"], *extra, "--report", out / "r",
            *_head_model(c)]


HEAD_CASES: dict[str, tuple[Callable[[Corpus, Path], list], str]] = {
    "no such head": (lambda c, out: ["segment", c.root / "heads" / "none.safetensors", c.volume, "--out",
                                     out / "labels.nii.gz", *_head_model(c)], "no such head file"),
    "head is not safetensors": (lambda c, out: _segment(c, out, "text.safetensors"), "not a readable head file"),
    "head without card": (lambda c, out: _segment(c, out, "no_card.safetensors"),
                          "not a BrainDINO head (no head card in the file)"),
    "head card not JSON": (lambda c, out: _segment(c, out, "card_not_json.safetensors"),
                           "the head card in the file is not valid (JSONDecodeError"),
    "head card of no task": (lambda c, out: _segment(c, out, "card_task.safetensors"), "unknown head task 'x'"),
    "head tensor mis-shaped": (lambda c, out: _segment(c, out, "mis_shaped.safetensors"),
                               "size mismatch for classifier.weight"),
    "segment with a classification head": (lambda c, out: _segment(c, out, "classification.safetensors"),
                                           "is a classification head; segment needs a segmentation head"),
    "predict with too few modalities": (
        lambda c, out: ["predict", c["head classification.safetensors"], c.volume, c.volume, c.volume,
                        *_head_model(c)], "needs 2 volumes per subject (image_t1, image_flair), got 3"),
    "predict a segmentation without --out": (
        lambda c, out: ["predict", c["head segmentation.safetensors"], c.volume, *_head_model(c)],
        "a segmentation head writes label volumes: give --out"),
    "head of another encoder": (
        lambda c, out: [*_segment(c, out, "segmentation.safetensors")[:5], "--model", c["encoder.safetensors"],
                        "--no-cache"], "but this segmentation head was fitted on"),
    "classification head on a segmentation manifest": (
        lambda c, out: _evaluate(c, out, "classification.safetensors", "segmentation", "--image-columns",
                                 "image,image"), "its label column holds label volumes (a segmentation manifest)"),
    "two-modality head on one image column": (
        lambda c, out: _evaluate(c, out, "classification.safetensors", "classification"),
        "missing column(s) image_t1, image_flair"),
    "classes the head does not know": (
        lambda c, out: _evaluate(c, out, "classification.safetensors", "classification", "--image-columns",
                                 "image,image"), "classes ['y'] are not among the head's ['a', 'b']"),
    "a split that matches nothing": (
        lambda c, out: _evaluate(c, out, "segmentation.safetensors", "segmentation", "--split", "val"),
        "no row has split 'val' (splits in this manifest: 'test', 'train')"),
    "a label volume missing": (
        lambda c, out: _evaluate(c, out, "segmentation.safetensors", "segmentation_missing_label", "--split", "all"),
        "line 3 (b): label '../images/nope_labels.nii.gz' does not exist"),
}


# -- manifests for fit-head

MANIFESTS = {
    "none": ("classification", "no such manifest file"),
    "empty": ("classification", "manifest is empty (no header row)"),
    "header_only": ("classification", "manifest has no rows"),
    "semicolons": ("classification", "columns are separated by semicolons (header 'case;split;image;label')"),
    "tabs": ("classification", "columns are separated by tabs"),
    "latin1": ("classification", "is not UTF-8 text (byte 0xe9 on line 4"),
    "no_image_column": ("classification", "no image column"),
    "no_label_column": ("classification", "missing column(s) label"),
    "one_class": ("classification", "label holds one class only ('x' in all 3 training rows)"),
    "empty_label": ("classification", "line 3 (b): label is missing ('')"),
    "nan_label": ("classification", "line 4 (c): label is missing ('NaN')"),
    "unknown_test_class": ("classification", "classes ['z'] are not among the head's ['x', 'y']"),
    "target_inf": ("regression", "line 3 (b): target 'inf' is not a finite number"),
    "target_nan": ("regression", "line 4 (c): target 'NaN' is not a finite number"),
    "target_text": ("regression", "line 4 (c): target 'old' is not a finite number"),
    "target_constant": ("regression", "every training row has target 5"),
    "event_two": ("survival", "line 3 (b): event '2' is neither 0 (censored) nor 1"),
    "time_negative": ("survival", "line 3 (b): time '-20' is below 0"),
    "no_events": ("survival", "no two training subjects can be compared (0 events among 3 subjects"),
    "no_comparable_pair": ("survival", "no two training subjects can be compared (1 events among 3 subjects"),
    "no_time_column": ("survival", "missing column(s) time"),
    "split_typo": ("classification", "line 4 (c): split 'tset' is neither train nor test"),
    "all_test": ("classification", "has no training rows (all 4 rows have split=test)"),
    "missing_image": ("classification", "line 3 (b): image '../images/nope.nii.gz' does not exist"),
    "repeated_column": ("classification", "column(s) image appear more than once in the header"),
    "segmentation_missing_label": ("segmentation", "line 3 (b): label '../images/nope_labels.nii.gz' does not exist"),
}


@pytest.mark.parametrize("name", MANIFESTS)
def test_bad_manifest(corpus, untouched, tmp_path, capsys, name):
    task, problem = MANIFESTS[name]
    manifest = corpus.files.get(f"manifest {name}", corpus.root / "manifests" / f"{name}.csv")
    head = tmp_path / "head.safetensors"
    code, stderr = run_in_process(["fit-head", "--task", task, "--manifest", manifest, "--out", head,
                                   *corpus.model_options()], capsys)
    assert_contract(code, stderr, problem, corpus, untouched, head)
    assert not (tmp_path / "head_report").exists() and not head.with_suffix("").with_suffix(".json").exists()


def test_latin1_class_names(corpus, untouched, tmp_path, capsys):
    code, stderr = run_in_process(["fit-head", "--task", "segmentation", "--manifest", corpus["manifest segmentation"],
                                   "--classes", corpus["manifest classes_latin1"], "--out",
                                   tmp_path / "h.safetensors", *corpus.model_options()], capsys)
    assert_contract(code, stderr, "is not UTF-8 text (byte 0x9c on line 2", corpus, untouched, tmp_path)


# -- options: rejected by the parser (one line, no usage block) or by the engine

def _pca(c: Corpus, out: Path) -> list:
    return ["pca", c.volume, "--out", out / "pca.nii.gz"]


def _similarity(c: Corpus, out: Path, *point: str) -> list:
    return ["similarity", c.volume, *point, "--out", out / "s.nii.gz", *_model(c)]


def _fit(c: Corpus, out: Path, *extra) -> list:
    return ["fit-head", "--task", "classification", "--manifest", c["manifest classification"], "--out",
            out / "h.safetensors", *extra, *_model(c)]


OPTION_CASES: dict[str, tuple[Callable[[Corpus, Path], list], str]] = {
    "no command": (lambda c, out: [], "braindino: error: the following arguments are required: COMMAND"),
    "unknown command": (lambda c, out: ["pcaa"], "invalid choice: 'pcaa'"),
    "unknown option": (lambda c, out: [*_pca(c, out), "--colour", *_model(c)], "unrecognized arguments: --colour"),
    "missing --out": (lambda c, out: ["pca", c.volume, *_model(c)], "the following arguments are required: --out"),
    "unknown output format": (lambda c, out: ["pca", c.volume, "--out", out / "pca.txt", *_model(c)],
                              "unknown output format"),
    "picture not PNG": (lambda c, out: [*_pca(c, out), "--png", out / "p.jpg", *_model(c)],
                        "picture files must end in .png"),
    "components 0": (lambda c, out: [*_pca(c, out), "--components", "0", *_model(c)],
                     "expected an integer from 1 to 64, got '0'"),
    "clusters 300": (lambda c, out: ["cluster", c.volume, "--out", out / "c.nii.gz", "-k", "300", *_model(c)],
                     "expected an integer from 1 to 255"),
    "point with NaN": (lambda c, out: _similarity(c, out, "--point-ras", "nan,4,2"),
                       "expected three comma-separated millimetres X,Y,Z, got 'nan,4,2'"),
    "point with inf": (lambda c, out: _similarity(c, out, "--point-lps=1e999,4,2"), "got '1e999,4,2'"),
    "point of two values": (lambda c, out: _similarity(c, out, "--point-ras", "-24,4"), "got '-24,4'"),
    "point outside the volume": (lambda c, out: _similarity(c, out, "--point-ras", "-400,4,2"),
                                 "lies outside the volume"),
    "two points": (lambda c, out: _similarity(c, out, "--point-ras=0,0,0", "--point-lps=0,0,0"),
                   "not allowed with argument"),
    "layers not numbers": (lambda c, out: ["embed", c.volume, "--layers", "a,b", *_model(c)],
                           "expected comma-separated block indices, got 'a,b'"),
    "layers out of range": (lambda c, out: ["embed", c.volume, "--layers", "0,9", *_model(c)],
                            "layers 0,9: out of range for teacher_checkpoint-"),
    "image size 0": (lambda c, out: [*_pca(c, out), *_model(c)[:-1], "0"], "expected an integer of at least 1"),
    "image size not a multiple of the patch": (
        lambda c, out: [*_pca(c, out), *_model(c)[:-1], "100"],
        "image size 100: must be a positive multiple of the model's patch size 16"),
    "batch size 0": (lambda c, out: [*_pca(c, out), *_model(c), "--batch-size", "0"],
                     "expected an integer of at least 1"),
    "device banana": (lambda c, out: [*_pca(c, out), *_model(c), "--device", "banana"],
                      "device 'banana': is not a device name"),
    "fit: validation share 2": (lambda c, out: _fit(c, out, "--val-fraction", "2"),
                                "expected a number from 0 to 0.9"),
    "fit: learning rate NaN": (lambda c, out: _fit(c, out, "--lr", "nan"), "expected a number from 0 to 10, got 'nan'"),
    "fit: no epochs": (lambda c, out: _fit(c, out, "--epochs", "0"), "expected an integer of at least 1"),
    "fit: more folds than rows": (lambda c, out: _fit(c, out, "--folds", "5"),
                                  "5 folds: cannot split 3 training subjects"),
    "fit: unknown task": (lambda c, out: ["fit-head", "--task", "grading", "--manifest", c["manifest classification"],
                                          "--out", out / "h.safetensors"], "invalid choice: 'grading'"),
    "fit: head not .safetensors": (
        lambda c, out: ["fit-head", "--task", "classification", "--manifest", c["manifest classification"], "--out",
                        out / "head.pt"], "a head is saved as a .safetensors file"),
    "make-cases: unknown task": (lambda c, out: ["make-cases", "--task", "tumour", "--out", out / "cases"],
                                 "tumour: unknown case task"),
    "make-cases: spacing 0": (lambda c, out: ["make-cases", "--task", "tissue", "--out", out / "cases", "--spacing",
                                              "0"], "expected a number from 0.5 to 10"),
    "pretrain: no config": (lambda c, out: ["pretrain", "--config", out / "none.yaml"], "no such config file"),
    "serve: weak token off loopback": (lambda c, out: ["serve", "--host", "0.0.0.0", "--token", "short", "--out",
                                                       out / "o"], "--token: must be at least 16 printable"),
    "serve: volume outside --data": (lambda c, out: ["serve", "--volume", "../atlas.py", "--out", out / "o"],
                                     "outside the data folder"),
    "serve: --data a file": (lambda c, out: ["serve", "--data", c.volume, "--out", out / "o"],
                             "is not a folder; --data takes the folder"),
    "serve: no --data folder": (lambda c, out: ["serve", "--data", out / "none", "--out", out / "o"],
                                "no such data folder"),
    "serve: --volume missing": (lambda c, out: ["serve", "--volume", "none.nii.gz", "--out", out / "o"],
                                "no such file in the data folder"),
    "serve: --out a file": (lambda c, out: ["serve", "--out", c.volume], "exists and is not a folder"),
    "serve: port 70000": (lambda c, out: ["serve", "--port", "70000"], "expected an integer from 0 to 65535"),
}


# -- cohorts: embed-cohort, and fit-head / evaluate reading a feature store

def _embed_cohort(c: Corpus, cohort: Path, out: Path, *extra) -> list:
    return ["embed-cohort", cohort, "--out", out, "--model", c.model, "--device", "cpu", "--image-size", IMAGE_SIZE,
            "--workers", "0", *extra]


def _fit_from(c: Corpus, out: Path, store: str, *extra) -> list:
    return ["fit-head", "--task", "segmentation", "--manifest", c["manifest segmentation"], "--out",
            out / "h.safetensors", "--store", c[store], *extra, "--model", c.model, "--device", "cpu"]


COHORT_CASES: dict[str, tuple[Callable[[Corpus, Path], list], str]] = {
    "embed-cohort: no such manifest": (
        lambda c, out: _embed_cohort(c, c.root / "manifests" / "none.csv", out / "s"), "no such manifest file"),
    "embed-cohort: manifest with semicolons": (
        lambda c, out: _embed_cohort(c, c["manifest semicolons"], out / "s"), "columns are separated by semicolons"),
    "embed-cohort: a folder of no volumes": (
        lambda c, out: _embed_cohort(c, c.root / "heads", out / "s"), "holds no volumes"),
    "embed-cohort: store over the manifest": (
        lambda c, out: _embed_cohort(c, c["manifest classification"], c["manifest classification"]),
        "exists and is not a folder"),
    "embed-cohort: store among other files": (
        lambda c, out: _embed_cohort(c, c["manifest classification"], c["store not a store"]),
        "is a folder of other files (beach.jpg, ...), not a BrainDINO feature store"),
    "embed-cohort: store of another resolution": (
        lambda c, out: _embed_cohort(c, c["manifest classification"], c["store"], "--image-size", "32"),
        "was made at another resolution (64 px input"),
    "embed-cohort: store of other blocks": (
        lambda c, out: _embed_cohort(c, c["manifest classification"], c["store without blocks"]),
        "holds encoder blocks none, not 0,1,2"),
    "embed-cohort: store of another model": (
        lambda c, out: _embed_cohort(c, c["manifest classification"], c["store"], "--model", c["encoder.safetensors"]),
        "was made with the model teacher_checkpoint-"),
    "embed-cohort: layers out of range": (
        lambda c, out: _embed_cohort(c, c["manifest classification"], out / "s", "--layers", "0,9"),
        "layers 0,9: out of range for teacher_checkpoint-"),
    "embed-cohort: processes 0": (
        lambda c, out: _embed_cohort(c, c["manifest classification"], out / "s", "--nproc-per-node", "0"),
        "expected an integer of at least 1"),
    "fit-head: no such store": (
        lambda c, out: [*_fit_from(c, out, "store"), "--store", c.root / "stores" / "none"], "no such feature store"),
    "fit-head: a folder that is no store": (
        lambda c, out: _fit_from(c, out, "store not a store"), "is not a BrainDINO feature store (no index.json)"),
    "fit-head: store index not JSON": (
        lambda c, out: _fit_from(c, out, "store index not JSON"), "is not a valid feature-store index"),
    "fit-head: store of another model": (
        lambda c, out: [*_fit_from(c, out, "store"), "--model", c["encoder.safetensors"]],
        "was made with the model teacher_checkpoint-"),
    "fit-head: store at another resolution": (
        lambda c, out: _fit_from(c, out, "store", "--image-size", "32"), "was made at another resolution"),
    "fit-head: store without the blocks the head reads": (
        lambda c, out: _fit_from(c, out, "store without blocks"), "holds encoder blocks none, not 0,1,2"),
    "evaluate: store at another resolution": (
        lambda c, out: [*_evaluate(c, out, "segmentation.safetensors", "segmentation"), "--store", c["store"],
                        "--image-size", "32"], "was made at another resolution"),
}


# Outputs over inputs, heads and what they are applied to, options, cohorts: one table of command lines.
COMMAND_LINES = {f"{group}: {name}": case for group, table in (("output", OUTPUT_CASES), ("head", HEAD_CASES),
                                                               ("option", OPTION_CASES), ("cohort", COHORT_CASES))
                 for name, case in table.items()}


@pytest.mark.parametrize("name", COMMAND_LINES)
def test_bad_command_line(corpus, untouched, tmp_path, capsys, name):
    build, problem = COMMAND_LINES[name]
    code, stderr = run_in_process(build(corpus, tmp_path), capsys)
    assert_contract(code, stderr, problem, corpus, untouched, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_requested_without_a_gpu(corpus, untouched, tmp_path, capsys):
    argv = ["pca", corpus.volume, "--out", tmp_path / "pca.nii.gz", *corpus.model_options(), "--device", "cuda"]
    code, stderr = run_in_process(argv, capsys)
    assert_contract(code, stderr, "device 'cuda': no CUDA GPU is available on this machine", corpus, untouched,
                    tmp_path)


# -- real processes: exit codes and stderr as a shell sees them

SUBPROCESS_CASES = {
    "no arguments": (lambda c, out: [], "braindino: error: the following arguments are required: COMMAND"),
    "missing volume": (lambda c, out: ["pca", c.root / "nope.nii.gz", "--out", out / "p.nii.gz"],
                       "nope.nii.gz: no such file or folder"),
    "output over the input": (lambda c, out: ["cluster", c.volume, "--out", c.root / "links" / "hardlink.nii.gz"],
                              "is the same file as the input"),
    "negative point accepted (then the volume is missing)": (
        lambda c, out: ["similarity", c.root / "nope.nii.gz", "--point-ras", "-24,4,2", "--out", out / "s.nii.gz"],
        "nope.nii.gz: no such file or folder"),
    "semicolon manifest": (lambda c, out: ["fit-head", "--task", "classification", "--manifest",
                                           c["manifest semicolons"], "--out", out / "h.safetensors"],
                           "columns are separated by semicolons"),
    "NaN voxels": (lambda c, out: ["embed", c["NaN in NIfTI"], "--no-cache"], "1 NaN or infinite voxels"),
}


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_real_process(corpus, untouched, tmp_path, name):
    build, problem = SUBPROCESS_CASES[name]
    result = subprocess.run([sys.executable, "-m", "BrainDINOLib.cli", *map(str, build(corpus, tmp_path))],
                            capture_output=True, text=True, timeout=300)
    assert_contract(result.returncode, result.stderr, problem, corpus, untouched, tmp_path)


# ---- what must not fail -----------------------------------------------------------------------------------------

def test_a_missing_dicom_slice_is_interpolated_at_its_true_position(tmp_path, caplog):
    image = sitk.GetImageFromArray(np.random.default_rng(1).random((10, 12, 14)).astype(np.float32) * 1000)
    image.SetSpacing((1.0, 1.0, 2.5))
    complete = read_volume(write_dicom_series(image, tmp_path / "complete", "LPS"))
    gap = write_dicom_series(image, tmp_path / "gap", "LPS")
    (gap / "slice0004.dcm").unlink()
    with caplog.at_level("WARNING"):
        resampled = read_volume(gap)
    assert "the DICOM series misses 1 slice(s), at 10 mm (between slice0003.dcm and slice0005.dcm) along the " \
        "slice axis; resampled onto its regular 2.5 mm slice grid" in caplog.text
    assert resampled.shape == complete.shape and resampled.geometry == complete.geometry
    np.testing.assert_array_equal(np.delete(resampled.array, 4, axis=0), np.delete(complete.array, 4, axis=0))
    np.testing.assert_allclose(resampled.array[4], (complete.array[3] + complete.array[5]) / 2, rtol=1e-5)


def test_the_same_image_in_training_and_test_is_reported(tmp_path, caplog):
    from BrainDINOLib.manifest import Manifest
    image = _write(downsampled(SAMPLE_T1, 8.0), tmp_path / "t1.nii.gz")
    os.link(image, tmp_path / "copy.nii.gz")
    (tmp_path / "cases.csv").write_text("case,split,image,label\na,train,t1.nii.gz,x\nb,train,t1.nii.gz,y\n"
                                        "c,test,copy.nii.gz,x\n")
    manifest = Manifest.read(tmp_path / "cases.csv")
    with caplog.at_level("WARNING"):
        manifest.warn_shared_images(["image"])
    assert "is used for training (line 3 (b)) and for testing (line 4 (c))" in caplog.text


def test_negative_coordinates_need_no_equals_sign():
    argv = join_negative_values(["similarity", "t1.nii.gz", "--point-ras", "-24,4,2", "--out", "s.nii.gz"])
    args = build_parser().parse_args(argv)
    assert args.point_ras.tolist() == [-24.0, 4.0, 2.0]
    assert join_negative_values(["--layers", "2,5", "--batch-size", "-3"]) == ["--layers", "2,5", "--batch-size", "-3"]


def test_the_atomic_writer_refuses_an_input_even_without_the_command_line(tmp_path):
    source = _write(downsampled(SAMPLE_T1, 8.0), tmp_path / "t1.nii.gz")
    os.link(source, tmp_path / "link.nii.gz")
    before = source.read_bytes()
    volume = read_volume(tmp_path / "link.nii.gz")
    with pytest.raises(BrainDINOError, match="is the same file as the input"):
        write_volume(volume, source)
    assert source.read_bytes() == before


def test_outputs_honour_the_umask_and_keep_a_replaced_file_mode(tmp_path):
    volume = read_volume(_write(downsampled(SAMPLE_T1, 8.0), tmp_path / "t1.nii.gz"))
    old = os.umask(0o022)
    try:
        write_volume(volume, tmp_path / "map.nii.gz")
        assert (tmp_path / "map.nii.gz").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_volume(volume, tmp_path / "private.nii.gz")
        assert (tmp_path / "private.nii.gz").stat().st_mode & 0o777 == 0o600
        (tmp_path / "map.nii.gz").chmod(0o640)
        write_volume(volume, tmp_path / "map.nii.gz")
        assert (tmp_path / "map.nii.gz").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_stale_temporary_files_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    folder = tmp_path / "cache" / "ab"
    folder.mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    files = {
        "stale": folder / f".entry{TEMP_MARKER}{dead}-x1.safetensors",  # killed writer, old: removed
        "young": folder / f".entry{TEMP_MARKER}{dead}-x2.safetensors",  # killed writer, but recent: kept
        "live": folder / f".entry{TEMP_MARKER}{os.getpid()}-x3.safetensors",  # a running writer: kept
        "entry": folder / "entry.safetensors",  # a cache entry: kept
        "someone else's": folder / ".entry-x4.safetensors",  # not our name: kept
    }
    for name, path in files.items():
        path.write_bytes(b"x")
        if name != "young":
            os.utime(path, (two_hours_ago, two_hours_ago))
    removed = remove_stale_temp_files(tmp_path / "cache")
    assert removed == [files["stale"]]
    assert [name for name, path in files.items() if path.exists()] == ["young", "live", "entry", "someone else's"]
    with atomic_path(tmp_path / "out.txt") as tmp:  # our own temporary names carry the marker and our pid
        assert tmp.name.startswith(f".out{TEMP_MARKER}{os.getpid()}-")
        tmp.write_text("done")


def test_a_damaged_cache_entry_is_discarded_and_recomputed(corpus, tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    argv = ["embed", corpus.volume, "--out", tmp_path / "first.safetensors", "--model", corpus.model,
            "--image-size", IMAGE_SIZE, "--device", "cpu", "--cache-dir", cache]
    assert main([str(a) for a in argv]) == 0
    (entry,) = cache.rglob("*.safetensors")
    data = bytearray(entry.read_bytes())
    middle = len(data) // 2  # inside the tensor data: the header (at the start) stays intact
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    entry.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        argv[3] = tmp_path / "second.safetensors"
        assert main([str(a) for a in argv]) == 0
    assert "discarded a damaged cache entry, computing it again" in caplog.text
    assert "is damaged: its tensor data do not match the checksum" in caplog.text
    from BrainDINOLib import VolumeFeatures
    first, second = (VolumeFeatures.load(tmp_path / f"{name}.safetensors") for name in ("first", "second"))
    assert torch.equal(first.patches, second.patches) and torch.equal(first.cls, second.cls)
    assert VolumeFeatures.load(entry).patches.shape == first.patches.shape  # the entry was written again


@pytest.mark.slow  # about 25 s on the loaded 2-core machine: features of four volumes and a short fit
def test_a_small_survival_cohort_is_fitted_even_when_its_test_part_cannot_be_scored(corpus, tmp_path, capsys):
    """One test subject has no one to be compared with: its C-index is undefined (NaN), not a crash after the
    head was written."""
    rows = [("a", "train", 10, 1), ("b", "train", 20, 0), ("c", "train", 30, 1), ("d", "test", 5, 1)]
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("case,split,image,time,event\n" + "".join(
        f"{case},{split},{corpus.root / 'images' / f't1_{n}.nii.gz'},{time_},{event}\n"
        for n, (case, split, time_, event) in enumerate(rows)))
    head = tmp_path / "risk.safetensors"
    code = main([str(a) for a in ["fit-head", "--task", "survival", "--manifest", manifest, "--out", head,
                                  "--val-fraction", "0", "--epochs", "3", *corpus.model_options()]])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "risk_report" / "metrics.json").read_text())
    assert head.is_file() and metrics["subjects"] == 1 and np.isnan(metrics["c_index"])
