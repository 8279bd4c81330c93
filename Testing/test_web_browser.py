"""`braindino serve` driven in a real headless Chromium: what a user does in the page, and what the server did.

One server (loopback, with a token, demo model at a coarse 12 mm resolution so features take seconds) and one
browser serve the whole module; the tests run in file order, each continuing where the previous one left the
page. Set BRAINDINO_SCREENSHOTS=<folder> to keep the screenshots (the README's pictures come from there).
Skipped, with the reason, where Chromium, EGL or the web extra are missing (.ci/run installs them).
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from BrainDINOLib.atlas import COLIN27_AAL
from BrainDINOLib.cli import main
from BrainDINOLib.resolution import default_policy
from BrainDINOLib.volume import ras_to_lps, read_volume, write_volume
from conftest import SAMPLE_T1
from web_browser import (chromium, choose, image_stats, missing_browser, point_in, serve, text, timed_click,
                         view_image, wait_for_picture, wait_for_text)

REASON = missing_browser()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"browser test: {REASON}"), pytest.mark.slow]

TOKEN = "browser-test-token-0123456789"
SAMPLE = "sample: Colin27 T1 (bundled)"
LABELLED_SLICES = (60, 85, 110)  # axial slices of the label file the page loads
VOXEL = r"\((\d+), (\d+), (\d+)\)"
# The server's resolution (demo model, 12 mm cells, bilinear upsampling: features in seconds on a CPU).
SERVER_RESOLUTION = ("--patch-mm", "12", "--upsampling", "bilinear")
POLICY = replace(default_policy("cpu"), patch_mm=12.0, image_size=None, upsampling="bilinear")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """--data: a label file (the brain, as the AAL atlas outlines it, on three axial slices) and a broken volume."""
    root = tmp_path_factory.mktemp("web")
    data = root / "data"
    data.mkdir()
    atlas = read_volume(COLIN27_AAL)
    painted = np.zeros(atlas.shape, np.int16)
    painted[list(LABELLED_SLICES)] = (atlas.array[list(LABELLED_SLICES)] > 0).astype(np.int16)
    write_volume(atlas.with_array(painted), data / "brain_labels.nii.gz")
    (data / "brain_labels.txt").write_text("1 brain\n")
    (data / "broken.nii.gz").write_bytes(SAMPLE_T1.read_bytes()[:5000])  # a download cut short
    # A segmentation head for the page to apply: the command line's few-shot head, at the server's resolution
    # (its features land in the server's cache), with the command line's segmentation to compare with.
    cache, reference = root / "cache", root / "cli"
    assert main(["few-shot", str(SAMPLE_T1), "--labels", str(data / "brain_labels.nii.gz"), "--out",
                 str(reference / "brain.nii.gz"), "--head", str(data / "brain_head.safetensors"), "--device", "cpu",
                 "--cache-dir", str(cache), *SERVER_RESOLUTION]) == 0
    return {"data": data, "out": root / "out", "cache": cache, "cli_segmentation": reference / "brain.nii.gz",
            "screenshots": Path(os.environ.get("BRAINDINO_SCREENSHOTS") or root / "screenshots")}


@pytest.fixture(scope="module")
def server(folders):
    with serve("--data", str(folders["data"]), "--out", str(folders["out"]), "--cache-dir", str(folders["cache"]),
               "--token", TOKEN, "--device", "cpu", *SERVER_RESOLUTION) as process:
        yield process


@pytest.fixture(scope="module")
def page(server):
    with chromium() as browser_page:
        yield browser_page


def screenshot(page, folders, name: str) -> None:
    folders["screenshots"].mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folders["screenshots"] / name))


def voxels(report: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in match) for match in re.findall(VOXEL, report)]


def test_page_without_the_token_gets_nothing(server, page):
    base = server.url.split("?")[0]
    for address in (base, base + "?secret=wrong-token-0123456789"):
        page.goto(address)
        page.wait_for_timeout(4000)
        assert page.locator(view_image("Red")).count() == 0, address
        assert page.locator("#volume-select").count() == 0
    assert "?secret=" + TOKEN in server.url


def test_page_shows_the_sample_in_three_views(server, page, folders):
    page.goto(server.url)
    choose(page, "volume-select", SAMPLE)
    wait_for_text(page, "#status", "loaded")
    for view in ("Red", "Green", "Yellow"):
        stats = wait_for_picture(page, view)
        assert stats["width"] > 200 and stats["std"] > 10 and stats["chroma"] < 1  # grey, not blank
    screenshot(page, folders, "page_loaded.png")


def test_a_broken_file_is_a_message_and_the_server_lives_on(page):
    choose(page, "volume-select", "broken.nii.gz")
    error = wait_for_text(page, "#error", "broken.nii.gz")
    assert error.startswith("broken.nii.gz:") and "/" not in error.split(":")[0]
    choose(page, "volume-select", SAMPLE)
    wait_for_text(page, "#status", "loaded")
    assert text(page, "#error") == ""
    wait_for_picture(page, "Red")


def test_features_show_pca_colours(page, folders):
    grey = image_stats(page, "Red")
    page.click("#compute")
    status = wait_for_text(page, "#status", "^features of|^stopped|^failed", timeout_s=300)
    assert status.startswith("features of"), text(page, "#error")
    pca = wait_for_picture(page, "Red", "s.chroma > 8", timeout_s=30)
    assert grey["chroma"] < 1 and pca["std"] > 10  # colours over the brain where it was grey, not a blank frame
    assert "demo" in text(page, "#model-info") and "12" in text(page, "#model-info")
    screenshot(page, folders, "page_pca.png")


def reference_similarity(folders, ras: np.ndarray):
    """The engine's similarity to an RAS point, computed here from the features the server left in the cache,
    with the cell-level map of the point's axial slice: (voxel map, cells, the point's cell)."""
    from BrainDINOLib.cache import FeatureCache
    from BrainDINOLib.maps import SimilarityIndex
    from BrainDINOLib.session import FeatureSession

    session = FeatureSession.open("demo", "cpu", POLICY, FeatureCache(folders["cache"]))
    index = SimilarityIndex(session.features(read_volume(SAMPLE_T1)))
    lps = ras_to_lps(ras)
    k, j, i = index.seed_voxel(lps)
    cells = index.cosine_cells(index.query(lps), [k])[0, 0].numpy()
    (origin_r, origin_c), (cell_r, cell_c) = index.features.slices.origin, index.features.slices.cell
    row0, col0, _, _ = index.features.slices.box
    cell = (int((j - row0 + 0.5 - origin_r) // cell_r), int((i - col0 + 0.5 - origin_c) // cell_c))
    return index.map(lps), cells, cell


def test_a_click_sets_the_similarity_point(page, folders):
    first = timed_click(page, "Red", 0.42, 0.55)
    seed = voxels(first["answer"])[0]
    # The click's RAS point is the voxel under the mouse: further right on the (radiological) axial view is
    # further to the patient's left (+i), on the same slice (k) and row (j).
    second = timed_click(page, "Red", 0.52, 0.55)
    report = second["answer"]
    moved = voxels(report)[0]
    assert moved[0] == seed[0] and abs(moved[1] - seed[1]) <= 1 and moved[2] > seed[2] + 5, (first, second)
    screenshot(page, folders, "page_similarity.png")
    # What the server showed is the engine's similarity to that point, and it peaks at the clicked cell.
    page.click("#save")
    status = wait_for_text(page, "#status", "^saved|^stopped|^failed", timeout_s=120)
    assert status.startswith("saved"), (status, text(page, "#error"))
    ras = np.array([float(v) for v in re.search(r"RAS \(([-\d.]+), ([-\d.]+), ([-\d.]+)\)", report).groups()])
    expected, cells, cell = reference_similarity(folders, ras)
    shown = read_volume(folders["out"] / "colin27_t1_similarity.nii.gz")
    assert shown.geometry == expected.geometry
    assert np.abs(shown.array - expected.array).max() < 1e-3
    peak = np.unravel_index(np.argmax(cells), cells.shape)
    assert cells[cell] > 0.5 and max(abs(a - b) for a, b in zip(peak, cell)) <= 1, (cells[cell], peak, cell)


def test_painting_and_few_shot_segmentation(page, folders):
    page.click("#brush-paint")
    wait_for_text(page, "#structures", "structure 1")
    wait_for_text(page, "#brush-status", "^painting with a 8 mm brush")
    start = point_in(page, "Red", 0.4, 0.5)
    page.mouse.move(*start)
    page.mouse.down()
    for step in range(1, 13):
        page.mouse.move(start[0] + 6 * step, start[1], steps=2)
    page.mouse.up()
    wait_for_text(page, "#painted-status", r"^painted axial slices \d+$")
    before = text(page, "#status")
    page.click("#learn")
    status = wait_for_text(page, "#status", "^few-shot|^stopped|^failed", timeout_s=120, other_than=before)
    assert re.match(r"few-shot: structure 1 learned from axial slices \d+ in", status), text(page, "#error")
    screenshot(page, folders, "page_painted.png")


def test_labels_from_a_file_and_few_shot_of_the_rest(page, folders):
    choose(page, "labels-select", "brain_labels.nii.gz")
    page.click("#load-labels")
    wait_for_text(page, "#status", "brain on axial slices 60, 85, 110")
    before = text(page, "#status")
    page.click("#learn")
    status = wait_for_text(page, "#status", "^few-shot|^stopped|^failed", timeout_s=120, other_than=before)
    assert status.startswith("few-shot: brain learned from axial slices 60, 85, 110"), text(page, "#error")
    page.click("#save")
    saved = wait_for_text(page, "#status", "^saved|^stopped|^failed", timeout_s=120)
    assert saved.startswith("saved"), text(page, "#error")
    out = folders["out"]
    written = sorted(p.name for p in out.iterdir())
    for name in ("colin27_t1_pca.nii.gz", "colin27_t1_similarity.nii.gz", "colin27_t1_few-shot.nii.gz",
                 "colin27_t1_few-shot.txt", "colin27_t1_report.png"):
        assert name in written, written
    sample, fewshot = read_volume(SAMPLE_T1), read_volume(out / "colin27_t1_few-shot.nii.gz")
    assert fewshot.geometry == sample.geometry
    brain = read_volume(COLIN27_AAL).array > 0
    others = [k for k in range(40, 140) if k not in LABELLED_SLICES]
    predicted = fewshot.array[others] == 1
    dice = 2 * (predicted & brain[others]).sum() / (predicted.sum() + brain[others].sum())
    assert dice > 0.7, dice  # the brain, learned from three slices, on the slices it was not shown
    screenshot(page, folders, "page_fewshot.png")


def test_a_fitted_head_gives_the_command_lines_segmentation(page, folders):
    choose(page, "head-select", "brain_head.safetensors")
    before = text(page, "#status")
    page.click("#apply-head")
    status = wait_for_text(page, "#status", "^segmented|^stopped|^failed", timeout_s=120, other_than=before)
    assert status == "segmented with brain_head.safetensors", text(page, "#error")
    page.click("#save")
    assert wait_for_text(page, "#status", "^saved|^stopped|^failed", timeout_s=120).startswith("saved")
    shown = read_volume(folders["out"] / "colin27_t1_head.nii.gz")
    cli = read_volume(folders["cli_segmentation"])
    assert shown.geometry == cli.geometry and (shown.array == cli.array).mean() > 0.999
    assert "1 brain\n" in (folders["out"] / "colin27_t1_head.txt").read_text()


def test_a_long_run_can_be_cancelled_and_the_page_stays_live(page):
    choose(page, "resolution-select", "legacy")  # 224 px on every slice: minutes on a CPU
    page.click("#compute")
    progress = wait_for_text(page, "#status", r"features: [1-9]\d*/\d+", timeout_s=180)
    page.click("#cancel")
    wait_for_text(page, "#status", "^cancelled$", timeout_s=60)
    assert progress and text(page, "#error") == ""
    choose(page, "resolution-select", "as started")
    answer = timed_click(page, "Red", 0.45, 0.5)["answer"]
    assert re.search(r"similarity [\d.]+ there", answer), answer
