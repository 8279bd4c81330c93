"""Cohorts: `braindino embed-cohort` into a feature store, and heads fitted and evaluated from it.

A cohort of six generated tissue cases at 6 mm and the tiny fixture encoder at 64 px (4 x 4 patches) on every slice,
so that a whole run is seconds of compute. Asserted: two gloo processes under torchrun write the same store as one
process, bit for bit; a run with one rank killed by SIGKILL, resumed (by one process), equals an uninterrupted one;
a feature file a killed writer left under its temporary name is neither served nor left behind; a second run changes
nothing; a run on a store another process is filling is refused; a volume that cannot be read is skipped and named,
and fails the run only with --strict; a head fitted (and evaluated) from the store equals one fitted by embedding
the manifest directly.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from heads_helpers import TEST_CASES
from safetensors import safe_open

from BrainDINOLib.atomic import TEMP_MARKER
from BrainDINOLib.cli import build_parser, main
from BrainDINOLib import PreprocessConfig, ResolutionPolicy
from BrainDINOLib.cohort import FeatureStore, StoreIdentity, read_cohort
from BrainDINOLib.commands.cohort import command_line
from BrainDINOLib.heads import load_head
from BrainDINOLib.synthetic import make_cases
from BrainDINOLib.threads import torch_threads

REPO = Path(__file__).resolve().parents[1]
CASES = 6
# Fields of an index record that say how a run went (timings, which process), not what the store holds.
RUN_FIELDS = ("read_seconds", "embed_seconds", "rank")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Six tissue cases at 6 mm: a manifest with `image` and `label` columns."""
    root = tmp_path_factory.mktemp("cohort")
    return make_cases("tissue", root / "cases", CASES - 2, 2, seed=3, config=replace(TEST_CASES, spacing_mm=6.0))


def model_options(teacher: Path) -> list[str]:
    # fp32: bit-for-bit equality across runs (int8 tokens depend on the batch a slice is quantised with)
    return ["--model", str(teacher), "--device", "cpu", "--precision", "fp32", "--image-size", "64",
            "--batch-size", "4"]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def embed_command(manifest: Path, store: Path, teacher: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "BrainDINOLib.cli", "embed-cohort", str(manifest), "--out", str(store),
            *model_options(teacher), "--workers", "1", *extra]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def file_contents(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
    """A safetensors file's metadata and the bytes of every tensor (the header's key order is not compared:
    safetensors writes the metadata map in an order that varies from process to process)."""
    with safe_open(path, "pt") as handle:
        return handle.metadata(), {name: handle.get_tensor(name).numpy().tobytes() for name in handle.keys()}


def store_contents(store: Path) -> tuple[dict[str, tuple], dict]:
    """Every feature file's contents by relative path, and the index without the fields that describe the run."""
    files = {str(p.relative_to(store)): file_contents(p) for p in sorted((store / "features").rglob("*.safetensors"))}
    index = json.loads((store / "index.json").read_text())
    for record in index["volumes"]:
        for name in RUN_FIELDS:
            record.pop(name)
    return files, index


@pytest.fixture(scope="module")
def one_process_store(cohort, tmp_path_factory, teacher_checkpoint) -> Path:
    store = tmp_path_factory.mktemp("stores") / "one"
    result = run(embed_command(cohort, store, teacher_checkpoint))
    assert f"embedded {CASES} volumes" in result.stdout and "volumes/min" in result.stdout, result.stdout
    return store


def test_the_store_lists_every_row_with_its_file_model_and_policy(cohort, one_process_store):
    index = json.loads((one_process_store / "index.json").read_text())
    assert index["identity"]["model_id"].startswith("teacher_checkpoint-")
    assert index["identity"]["policy"]["image_size"] == 64 and index["identity"]["layers"] == [0, 1, 2]
    assert [e["case"] for e in index["entries"]] == [e.case for e in read_cohort(cohort).entries]
    assert all(e["status"] == "done" and (one_process_store / e["file"]).is_file() for e in index["entries"])
    assert not (one_process_store / "journal").exists() or not list((one_process_store / "journal").iterdir())
    store = FeatureStore.open(one_process_store)
    features = store.features(cohort.parent / index["entries"][0]["image"], layers=(0, 2))
    assert features.patches.shape[1:] == (4, 4, features.patches.shape[-1]) and sorted(features.layers) == [0, 1, 2]
    assert features.num_slices == len(features.slices.slice_indices) > 5  # every slice of the head at 64 px


@pytest.mark.slow
def test_two_processes_write_the_same_store_as_one_bit_for_bit(cohort, one_process_store, tmp_path,
                                                                  teacher_checkpoint):
    store = tmp_path / "two"
    result = run(embed_command(cohort, store, teacher_checkpoint, "--nproc-per-node", "2"))
    assert "2 process(es)" in result.stdout, result.stdout
    index = json.loads((store / "index.json").read_text())
    assert sorted({v["rank"] for v in index["volumes"]}) == [0, 1]
    assert store_contents(store) == store_contents(one_process_store)


def _rank_process(launcher: psutil.Process, rank: str) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if "BrainDINOLib.cli" in child.cmdline() and child.environ().get("RANK") == rank:
                return child
        except psutil.Error:
            continue
    return None


def _survivors(store: Path, wait_s: float = 15) -> list[psutil.Process]:
    """Processes whose command line names `store`, once they had `wait_s` seconds to end."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for process in psutil.process_iter(["cmdline"]):
            if any(str(store) in word for word in process.info["cmdline"] or ()):
                alive.append(process)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_then_resumed_gives_the_same_store(cohort, one_process_store, tmp_path,
                                                                       teacher_checkpoint):
    store = tmp_path / "killed"
    launcher = subprocess.Popen(embed_command(cohort, store, teacher_checkpoint, "--nproc-per-node", "2"),
                                env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = store / "journal" / "rank-00001.jsonl"
    deadline = time.monotonic() + 240
    while launcher.poll() is None and time.monotonic() < deadline:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.01)
    victim = _rank_process(psutil.Process(launcher.pid), "1")
    assert victim is not None, "the run finished before rank 1 could be killed"
    victim.send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not _survivors(store), "a process of the killed run (a rank or its reading worker) lives on"
    index = json.loads((store / "index.json").read_text())
    assert all(e["status"] == "pending" for e in index["entries"]), "a killed run indexed something"
    killed = FeatureStore.open(store).records()
    assert 0 < sum(r.done for r in killed.values()) < CASES, "the kill landed before or after the work"

    resumed = run(embed_command(cohort, store, teacher_checkpoint))
    assert f"embedded {CASES - sum(r.done for r in killed.values())} volumes" in resumed.stdout, resumed.stdout
    assert not list(store.rglob(f"*{TEMP_MARKER}*")), "the killed run's temporary files were left in the store"
    assert store_contents(store) == store_contents(one_process_store)


def test_a_feature_file_a_killed_rank_wrote_but_did_not_rename_is_embedded_again(cohort, one_process_store, tmp_path,
                                                                               teacher_checkpoint, capsys):
    """A rank killed after writing a volume's feature file but before renaming it leaves a complete file under its
    temporary name (one killed sooner, a torn one). The store does not serve it: the resumed run embeds the volume
    into its real file and removes both temporary files, however recent."""
    store = tmp_path / "store"
    shutil.copytree(one_process_store, store)
    index = json.loads((store / "index.json").read_text())
    record = index["volumes"].pop(0)
    index["entries"] = [{**e, "status": "pending", "file": ""} if e["path"] == record["path"] else e
                        for e in index["entries"]]
    (store / "index.json").write_text(json.dumps(index))
    target = store / record["file"]
    killed_writer = ("import os, signal, sys\nfrom BrainDINOLib.atomic import atomic_path\n"
                     "data = open(sys.argv[1], 'rb').read()\nos.remove(sys.argv[1])\n"
                     "with atomic_path(sys.argv[1]) as tmp:\n"
                     "    tmp.write_bytes(data[:int(sys.argv[2])])\n"
                     "    os.kill(os.getpid(), signal.SIGKILL)\n")
    for size in (target.stat().st_size, 100):  # complete, then torn (each killed writer removes the file first)
        shutil.copyfile(one_process_store / record["file"], target)
        killed = subprocess.run([sys.executable, "-c", killed_writer, str(target), str(size)], env=environment())
        assert killed.returncode == -signal.SIGKILL
    assert not target.exists() and len(list(target.parent.glob(f".*{TEMP_MARKER}*"))) == 2
    opened = FeatureStore.open(store)
    assert opened.files.get(target.parent.name, opened.identity.policy, opened.identity.layers) is None

    with torch_threads(1):
        assert main(["embed-cohort", str(cohort), "--out", str(store), *model_options(teacher_checkpoint),
                     "--workers", "0"]) == 0
    assert "embedded 1 volumes" in capsys.readouterr().out
    assert not list(store.rglob(f"*{TEMP_MARKER}*")), "a killed writer's temporary file was left in the store"
    assert store_contents(store) == store_contents(one_process_store)


def test_a_second_run_changes_nothing(cohort, one_process_store, tmp_path, teacher_checkpoint, capsys):
    store = tmp_path / "again"
    shutil.copytree(one_process_store, store)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*.safetensors")}
    index = (store / "index.json").read_bytes()
    with torch_threads(1):
        assert main(["embed-cohort", str(cohort), "--out", str(store), *model_options(teacher_checkpoint),
                     "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "nothing to embed" in out and f"{CASES} volume(s) were already in the store" in out, out
    assert (store / "index.json").read_bytes() == index
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.safetensors")} == before


HOLD_THE_STORE = """
import sys, time
from BrainDINOLib.cohort import FeatureStore
store = FeatureStore.open(sys.argv[1])
with FeatureStore.filling(store.root, store.identity):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_on_a_store_another_run_is_filling_is_refused_until_that_one_ends(cohort, one_process_store, tmp_path,
                                                                               teacher_checkpoint, capsys):
    """Another process holds the store as a run does: embed-cohort (one process, or the torchrun launcher) exits
    with code 2 and one line, leaving the store as it was; once that process is killed, the same command runs."""
    store = tmp_path / "busy"
    shutil.copytree(one_process_store, store)
    index = (store / "index.json").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_STORE, str(store)], env=environment(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--nproc-per-node", "2"]):
            with torch_threads(1):
                assert main(["embed-cohort", str(cohort), "--out", str(store), *model_options(teacher_checkpoint),
                             "--workers", "0", *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (f"braindino: error: {store}: another run is filling this store now; wait for it to end, "
                           "or give another folder"), err
        assert (store / "index.json").read_bytes() == index
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with torch_threads(1):
        assert main(["embed-cohort", str(cohort), "--out", str(store), *model_options(teacher_checkpoint),
                     "--workers", "0"]) == 0
    assert "nothing to embed" in capsys.readouterr().out


def test_a_bad_volume_in_the_middle_is_skipped_and_named(cohort, one_process_store, tmp_path, teacher_checkpoint,
                                                         capsys):
    lines = cohort.read_text().splitlines()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((cohort.parent / lines[3].split(",")[2]).read_bytes()[:3000])  # cut short
    header, rows = lines[0], lines[1:]
    rows[2] = rows[2].replace(rows[2].split(",")[2], str(broken))
    rows[3] = ",".join("" if n == 2 else v for n, v in enumerate(rows[3].split(",")))  # an empty image cell
    manifest = cohort.parent / "with_bad_rows.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    store = tmp_path / "store"
    shutil.copytree(one_process_store, store)  # the good volumes are in it already: only the bad ones are tried
    argv = ["embed-cohort", str(manifest), "--out", str(store), *model_options(teacher_checkpoint), "--workers", "1"]
    with torch_threads(1):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "2 of 6 image(s) skipped" in out, out
        assert f"line 4 (tissue-3-0002), image {str(broken)!r}: " in out and "truncated" in out, out
        assert "line 5 (tissue-3-0003), image '': no image in column image" in out, out
        entries = json.loads((store / "index.json").read_text())["entries"]
        assert [e["status"] for e in entries] == ["done", "done", "skipped", "skipped", "done", "done"]
        assert main([*argv, "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of 6 image(s) could not be embedded (--strict)" in err, err


def regression_manifest(cohort: Path) -> Path:
    """The cohort's images with a made-up target per case, for a subject head."""
    lines = cohort.read_text().splitlines()
    rows = [line.split(",")[:3] for line in lines[1:]]
    manifest = cohort.parent / "regression.csv"
    manifest.write_text("\n".join(["case,split,image,target", *(",".join([*row, f"{1.5 * n:g}"])
                                                                 for n, row in enumerate(rows))]) + "\n")
    return manifest


@pytest.mark.parametrize("task", ["segmentation", "regression"])
def test_a_head_fitted_and_evaluated_from_the_store_equals_one_from_embedding(cohort, one_process_store, tmp_path,
                                                                              teacher_checkpoint, capsys, task):
    manifest = cohort if task == "segmentation" else regression_manifest(cohort)
    fit = ["fit-head", "--task", task, "--manifest", str(manifest), "--epochs", "5", "--val-fraction", "0"]
    with torch_threads(1):
        assert main([*fit, "--out", str(tmp_path / "direct.safetensors"), *model_options(teacher_checkpoint),
                     "--no-cache"]) == 0
        assert main([*fit, "--out", str(tmp_path / "stored.safetensors"), "--store", str(one_process_store),
                     "--model", str(teacher_checkpoint), "--device", "cpu", "--precision", "fp32", "--batch-size", "4",
                     "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert out.count("64 px input, every slice") == 2, out  # the store's resolution, without resolution options
    direct, stored = load_head(tmp_path / "direct.safetensors"), load_head(tmp_path / "stored.safetensors")
    assert direct.card.layers == stored.card.layers == ((0, 1, 2) if task == "segmentation" else ())
    assert direct.module.state_dict().keys() == stored.module.state_dict().keys()
    for name, tensor in direct.module.state_dict().items():
        assert torch.equal(tensor, stored.module.state_dict()[name]), name
    reports = [json.loads((tmp_path / f"{name}_report" / "metrics.json").read_text()) for name in ("direct", "stored")]
    assert reports[0] == reports[1] and reports[0].get("cases", reports[0].get("subjects")) == 2, reports


def test_the_launcher_hands_torchrun_the_same_command_line():
    parser = build_parser()
    argv = ["embed-cohort", "cases.csv", "--out", "store", "--layers", "", "--image-columns", "image_t1,image_flair",
            "--patch-mm", "4.5", "--nproc-per-node", "2", "--strict", "--model=-odd-name.pth"]
    args = parser.parse_args(argv)
    again = parser.parse_args(["embed-cohort", *command_line(args.command_parser, args, {"nproc_per_node", "strict"})])
    assert {k: v for k, v in vars(again).items() if k not in ("nproc_per_node", "strict")} == \
        {k: v for k, v in vars(args).items() if k not in ("nproc_per_node", "strict")}
    assert again.layers == () and again.nproc_per_node == 1 and not again.strict


def test_a_store_is_filled_at_one_precision_and_read_at_any():
    """Resuming at another precision would mix int8 and fp32 files in one store; heads read either."""
    fp32 = StoreIdentity("model-1", "fp32", PreprocessConfig(), ResolutionPolicy(patch_mm=6.0), (0, 1))
    int8 = replace(fp32, precision="int8")
    assert fp32.mismatch(int8) == "was made at fp32 precision, not int8; pass --precision fp32, or use another store"
    assert fp32.mismatch(int8, reading=True) == "" and StoreIdentity.from_dict(fp32.to_dict()) == fp32
