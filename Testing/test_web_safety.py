"""What a page of `braindino serve` may do, checked without a browser: the data-folder jail, the output folder,
the bind and token rules. The command's refusals before anything slow is loaded are in test_hostile_inputs.py."""
from __future__ import annotations

import os
import shutil

import pytest

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.web.safety import MIN_TOKEN_LENGTH, DataFolder, OutputFolder, connection_token, is_loopback
from conftest import SAMPLE_T1


@pytest.fixture()
def data(tmp_path):
    """A data folder with a volume in a subfolder, a DICOM-like folder, a checkpoint, a hidden file, a symlink
    that stays inside and one that leads out."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    shutil.copy(SAMPLE_T1, root / "sub" / "t1.nii.gz")
    (root / "series").mkdir()
    (root / "series" / "slice0001.dcm").write_bytes(b"")
    (root / "model.pth").write_bytes(b"")
    (root / ".hidden.nii.gz").write_bytes(b"")
    (tmp_path / "secret.nii.gz").write_bytes(b"")
    os.symlink(tmp_path / "secret.nii.gz", root / "outside.nii.gz")
    os.symlink(root / "sub" / "t1.nii.gz", root / "inside.nii.gz")
    return DataFolder(root)


def test_data_folder_lists_what_the_page_may_open(data):
    assert data.volumes() == ["inside.nii.gz", "series", "sub/t1.nii.gz"]
    assert data.model_files() == ["model.pth"]


@pytest.mark.parametrize("name", ["outside.nii.gz", "../secret.nii.gz", "sub/../../secret.nii.gz", "/etc/passwd",
                                  "missing.nii.gz", ""])
def test_data_folder_refuses_names_that_leave_it(data, name):
    with pytest.raises(BrainDINOError) as refused:
        data.resolve(name)
    assert "\n" not in str(refused.value)


def test_data_folder_follows_symlinks_that_stay_inside(data):
    assert data.resolve("inside.nii.gz") == data.root / "sub" / "t1.nii.gz"


def test_data_folder_must_exist(tmp_path):
    with pytest.raises(BrainDINOError, match="no such data folder"):
        DataFolder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BrainDINOError, match="is not a folder"):
        DataFolder(tmp_path / "file")


def test_output_folder_takes_plain_names_only(tmp_path):
    out = OutputFolder(tmp_path / "out")
    assert out.path("t1_pca.nii.gz") == tmp_path / "out" / "t1_pca.nii.gz"
    assert (tmp_path / "out").is_dir()
    for name in ["../escape.nii.gz", "sub/x.nii.gz", "/tmp/x.nii.gz", ".hidden", "", "a\\b"]:
        with pytest.raises(BrainDINOError, match="plain file name"):
            out.path(name)
    os.symlink(tmp_path / "elsewhere.nii.gz", tmp_path / "out" / "link.nii.gz")
    with pytest.raises(BrainDINOError, match="symlink"):
        out.path("link.nii.gz")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BrainDINOError, match="not a folder"):
        OutputFolder(tmp_path / "file")


def test_loopback_and_tokens():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("no-such-host.invalid")
    assert connection_token("127.0.0.1", None) is None  # loopback: no token unless asked for
    generated = connection_token("0.0.0.0", None)
    assert len(generated) >= MIN_TOKEN_LENGTH and generated != connection_token("0.0.0.0", None)
    assert connection_token("0.0.0.0", "x" * MIN_TOKEN_LENGTH) == "x" * MIN_TOKEN_LENGTH
    for weak in ["", "short", "has a space in it!!", "x" * (MIN_TOKEN_LENGTH - 1)]:
        with pytest.raises(BrainDINOError, match="--token"):
            connection_token("0.0.0.0", weak)
