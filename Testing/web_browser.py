"""Driving `braindino serve` in a real browser: Debian's headless Chromium through Playwright (never a downloaded
browser), shared by the browser test and benchmarks/web_speed.py.

What to wait on, and why (each learnt the hard way):
- a view's picture is trame-rca's `<img class="image-display-area">` (a blob URL; there is no canvas); a view is
  found by the marker div the page puts in it (`.view-Red` axial, `.view-Green` coronal, `.view-Yellow` sagittal);
- "rendered" means the image has loaded and its pixels (read through a canvas: the blob is same-origin) are not
  blank; "changed" means a new frame whose pixels differ from the frame shown when the wait was armed;
- the server's answers are texts it writes into the page; wait for them to change, not only to match, or the
  previous answer passes;
- a state change (a switch) and a mouse event travel on different channels: wait for the server's echo of the
  first before sending the second.
"""
from __future__ import annotations

import contextlib
import ctypes.util
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READY = re.compile(r"BrainDINO page: (\S+)")
SERVE = [sys.executable, "-m", "BrainDINOLib.cli", "serve"]

# Statistics of a view's picture: size, mean and standard deviation of grey, mean chroma (max - min of RGB).
IMAGE_STATS_JS = """(selector) => {
  const img = document.querySelector(selector);
  if (!img || !img.complete || img.naturalWidth === 0) return null;
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sum2 = 0, chroma = 0; const n = d.length / 4;
  for (let i = 0; i < d.length; i += 4) {
    const v = (d[i] + d[i+1] + d[i+2]) / 3; sum += v; sum2 += v * v;
    chroma += Math.max(d[i], d[i+1], d[i+2]) - Math.min(d[i], d[i+1], d[i+2]);
  }
  const mean = sum / n;
  return {width: c.width, height: c.height, mean, std: Math.sqrt(sum2 / n - mean * mean), chroma: chroma / n};
}"""

# Arms two watchers and returns performance.now(): window.__changed is set to the time of the first new frame of
# the view whose pixels differ from the frame shown now (mean |dRGB| > threshold), window.__answered to the time
# the text of the answer element first changes.
ARM_JS = """([imgSelector, answerSelector, threshold]) => {
  const img = document.querySelector(imgSelector), answer = document.querySelector(answerSelector);
  const pixels = () => { const c = document.createElement('canvas'); c.width = img.naturalWidth;
    c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    return g.getImageData(0, 0, c.width, c.height).data; };
  const before = pixels(), oldText = answer.innerText;
  window.__changed = null; window.__answered = null;
  const frames = new MutationObserver(async () => {
    try { await img.decode(); } catch (e) { return; }
    const now = pixels();
    let diff = 255;
    if (now.length === before.length) {
      diff = 0;
      for (let i = 0; i < now.length; i += 4)
        diff += Math.abs(now[i] - before[i]) + Math.abs(now[i+1] - before[i+1]) + Math.abs(now[i+2] - before[i+2]);
      diff /= 3 * now.length / 4;
    }
    if (diff > threshold && window.__changed === null) { window.__changed = performance.now(); frames.disconnect(); }
  });
  frames.observe(img, {attributes: true, attributeFilter: ['src']});
  const texts = new MutationObserver(() => {
    if (answer.innerText !== oldText && window.__answered === null) {
      window.__answered = performance.now(); texts.disconnect(); } });
  texts.observe(answer, {childList: true, characterData: true, subtree: true});
  return performance.now();
}"""


def missing_browser() -> str | None:
    """Why the browser test cannot run here (one line), or None when it can."""
    if importlib.util.find_spec("trame_slicer") is None:
        return "the web extra is not installed (pip install -e '.[test,web]')"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; no browser download is needed)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    if ctypes.util.find_library("EGL") is None:
        return "no EGL library for off-screen rendering (apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    """A `braindino serve` process: its address once ready, when it started, and its output so far."""

    process: subprocess.Popen
    started: float
    url: str
    output: list[str]


@contextlib.contextmanager
def serve(*arguments: str, timeout_s: float = 240.0) -> Iterator[ServerProcess]:
    """Start `braindino serve --port <free> ARGUMENTS` and yield it once it prints its address; stop it after."""
    started = time.perf_counter()
    process = subprocess.Popen([*SERVE, "--port", str(free_port()), *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if READY.search(line):
                ready.set()
        ready.set()  # the process ended

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(timeout_s) or process.poll() is not None:
            raise RuntimeError(f"braindino serve did not start in {timeout_s:.0f} s:\n" + "\n".join(output[-30:]))
        url = next(READY.search(line).group(1) for line in output if READY.search(line))
        yield ServerProcess(process, started, url, output)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def chromium(width: int = 1500, height: int = 760):
    """A page in Debian's headless Chromium, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    # Chromium puts its singleton socket under TMPDIR, and a Unix socket path holds at most 107 bytes: a test's
    # deep temporary folder (pytest-xdist's popen-gw1/...) is too long, so the profile lives in a short one.
    profile = tempfile.mkdtemp(prefix="braindino-chromium-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": width, "height": height}, env={**os.environ, "TMPDIR": profile})
            try:
                yield context.new_page()
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def view_image(view: str) -> str:
    """CSS selector of the picture of one slice view: "Red" (axial), "Green" (coronal), "Yellow" (sagittal)."""
    return f"div:has(> .view-{view}) img.image-display-area"


def image_stats(page, view: str = "Red") -> dict | None:
    return page.evaluate(IMAGE_STATS_JS, view_image(view))


def wait_for_picture(page, view: str = "Red", condition: str = "s.std > 10", timeout_s: float = 120.0) -> dict:
    """Wait until the view shows a picture whose statistics `s` meet `condition` (JS); return them."""
    page.wait_for_function(f"(sel) => {{ const s = ({IMAGE_STATS_JS})(sel); return s !== null && ({condition}); }}",
                           arg=view_image(view), timeout=timeout_s * 1000, polling=100)
    return image_stats(page, view)


def text(page, selector: str) -> str:
    return page.inner_text(selector)


def wait_for_text(page, selector: str, pattern: str, timeout_s: float = 60.0, other_than: str | None = None) -> str:
    """Wait until the element's text matches the regular expression (and differs from `other_than`); return the
    text that matched (background work may change it a moment later)."""
    matched = page.wait_for_function(
        "([sel, pat, old]) => { const e = document.querySelector(sel);"
        " return e !== null && new RegExp(pat).test(e.innerText) && (old === null || e.innerText !== old)"
        " && { text: e.innerText }; }",
        arg=[selector, pattern, other_than], timeout=timeout_s * 1000, polling=100)
    return matched.json_value()["text"]


def choose(page, select_id: str, option: str) -> None:
    """Pick `option` in a Vuetify select (its input is covered by the field, which opens the menu)."""
    page.locator(f".v-field:has(#{select_id})").click()
    page.get_by_role("option", name=option, exact=True).click()


def point_in(page, view: str, fx: float, fy: float) -> tuple[float, float]:
    """Page coordinates of a point given as fractions of a view's picture."""
    box = page.locator(view_image(view)).bounding_box()
    return box["x"] + box["width"] * fx, box["y"] + box["height"] * fy


def timed_click(page, view: str, fx: float, fy: float, answer: str = "#click-report",
                timeout_s: float = 60.0) -> dict:
    """Click a view and time, in the browser, the server's answer and the first visibly changed frame (ms)."""
    x, y = point_in(page, view, fx, fy)
    clicked = page.evaluate(ARM_JS, [view_image(view), answer, 1.0])
    page.mouse.click(x, y)
    page.wait_for_function("window.__answered !== null", timeout=timeout_s * 1000, polling=20)
    page.wait_for_function("window.__changed !== null", timeout=timeout_s * 1000, polling=20)
    answered, changed = page.evaluate("[window.__answered, window.__changed]")
    return {"answer": page.inner_text(answer), "answer_ms": answered - clicked, "picture_ms": changed - clicked}
