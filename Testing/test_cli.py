"""The `braindino` command: real subprocesses, exit codes, one-line errors, outputs."""
import subprocess
import sys

import pytest
import torch

from BrainDINOLib import VolumeFeatures
from BrainDINOLib.cli import main
from conftest import SAMPLE_T1


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "BrainDINOLib.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, problem", [
    (["embed", "no/such/volume.nii.gz", "--model", "x"], "no/such/volume.nii.gz: no such file or folder"),
    (["info", "no/such/model.pth"], "no/such/model.pth: no such checkpoint file (built-in model names: demo)"),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, problem):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"braindino: error: {problem}"
    assert "Traceback" not in result.stderr


def test_itk_warnings_do_not_leak_to_stderr(tmp_path):
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "IM0001.dcm").write_bytes(b"DICM" * 100)
    result = run("embed", str(folder), "--no-cache")
    assert result.returncode == 2
    assert result.stderr.strip() == f"braindino: error: {folder}: no DICOM series found in this folder"


def test_bad_checkpoint_through_the_cli(tmp_path):
    bad = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    result = run("embed", str(SAMPLE_T1), "--model", str(bad), "--no-cache")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"braindino: error: {bad}: unknown checkpoint kind")
    assert len(result.stderr.strip().splitlines()) == 1


def test_embed_writes_features(tmp_path, teacher_checkpoint, capsys):
    out = tmp_path / "colin.safetensors"
    code = main(["embed", str(SAMPLE_T1), "--model", str(teacher_checkpoint), "--image-size", "112",
                 "--layers", "0,2", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "x 7x7 tokens x 256 dims" in printed and f"wrote {out}" in printed
    assert "features: " in printed and "112 px input, every slice, guided upsampling" in printed
    features = VolumeFeatures.load(out)
    assert features.grid == (7, 7) and set(features.layers) == {0, 2}
    assert features.source == str(SAMPLE_T1)


def test_help_and_a_missing_file_need_none_of_the_heavy_libraries():
    """`braindino --help` and a mistyped path answer at once: nothing imports torch, timm, scipy, scikit-learn,
    MONAI or SimpleITK on the way (the speed figures are in the README)."""
    script = ("import sys\nfrom BrainDINOLib.cli import build_parser, main\nbuild_parser()\n"
              "code = main(['embed', 'no/such/volume.nii.gz'])\n"
              "print(code, sorted({'torch', 'timm', 'scipy', 'sklearn', 'monai', 'SimpleITK'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "2 []", result.stderr
    assert result.stderr.strip() == "braindino: error: no/such/volume.nii.gz: no such file or folder"


def _subcommand_actions(name: str) -> dict:
    from BrainDINOLib.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {action.dest: action for action in subparsers.choices[name]._actions}


def test_options_left_out_keep_the_engine_defaults_which_the_help_states():
    """Options mapped onto a config (`commands.common.given`) have no default of their own: left out, they keep
    the engine's; the number in their help is that default."""
    import dataclasses
    import inspect
    import re

    from BrainDINOLib.demo import DemoConfig
    from BrainDINOLib.training.shards import prepare_slices

    demo_defaults = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    shard_defaults = {name: p.default for name, p in inspect.signature(prepare_slices).parameters.items()}
    for command, names, defaults in [("demo", ("clusters", "labelled_slices"), demo_defaults),
                                     ("prepare-slices", ("image_size", "patch_size", "shard_size"), shard_defaults)]:
        actions = _subcommand_actions(command)
        for name in names:
            assert actions[name].default == "==SUPPRESS=="
            assert re.search(r"\(default (\S+)\)", actions[name].help).group(1) == str(defaults[name]), name


def test_map_options_default_to_the_maps_own_defaults():
    """`pca` and `cluster` restate no number: left out, their options are the map functions' defaults."""
    import inspect

    from BrainDINOLib.maps import cluster_map, pca_map

    for command, function, names in [("pca", pca_map, {"components": "components", "seed": "seed"}),
                                     ("cluster", cluster_map, {"clusters": "k", "seed": "seed"})]:
        actions = _subcommand_actions(command)
        parameters = inspect.signature(function).parameters
        for option, parameter in names.items():
            assert actions[option].default == parameters[parameter].default, (command, option)
            assert f"(default {parameters[parameter].default})" in actions[option].help % {
                "default": actions[option].default}, (command, option)
