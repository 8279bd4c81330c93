"""`braindino serve` as a user meets it, in Debian's headless Chromium: start to first picture, time per similarity
click, and the server's memory.

One run per resolution setting given (default: the CPU default with guided upsampling, then the same with bilinear
upsampling), each on a fresh server with the demo model and the bundled Colin27 T1 opened at start:
- start: `braindino serve` launched -> it prints its address -> the axial view shows a non-blank slice in the page;
- features: Compute clicked -> PCA shown (a fresh feature cache per run: the encoder runs);
- clicks: `--clicks` clicks at different places of the axial view; per click the server's own times (the map in
  the Logic, showing it in MRML, click to report on the server) and, in the browser, click -> report shown and
  click -> first visibly changed picture of the axial view;
- memory: the server process's RSS with the volume shown, and after features, PCA and the clicks.

With `--baseline DIR` (a checkout of another commit, e.g. `git archive <commit> | tar -x -C DIR`) every setting
runs twice, first with that checkout's engine and server, then with this one: a before/after in one run.

    .venv/bin/python benchmarks/web_speed.py [--clicks 6] [--setting "" --setting "--upsampling bilinear"]
    .venv/bin/python benchmarks/web_speed.py --baseline /tmp/braindino-main   # before/after, interleaved
    .venv/bin/python benchmarks/web_speed.py --smoke      # one short run at 12 mm: the path works
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "Testing"))
from web_browser import chromium, missing_browser, serve, timed_click, wait_for_picture, wait_for_text  # noqa: E402

SERVER_TIMES = re.compile(r"map ([\d.]+) s, shown ([\d.]+) s, total ([\d.]+) s")


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def one_run(setting: str, clicks: int, code: Path | None = None) -> dict:
    """Start a server with `setting` (extra serve options), with the engine in `code` if given (else this one),
    drive it, and return what was measured."""
    here = Path.cwd()
    if code:
        os.chdir(code)  # the server is `python -m BrainDINOLib.cli serve`, which imports from its folder first
    try:
        return {**measure(setting, clicks), "code": str(code) if code else "this checkout"}
    finally:
        os.chdir(here)


def measure(setting: str, clicks: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="braindino-web-bench-") as work:
        arguments = ["--volume", "colin27_t1.nii.gz", "--device", "cpu", "--out", f"{work}/out",
                     "--cache-dir", f"{work}/cache", *shlex.split(setting)]
        with serve(*arguments) as server, chromium() as page:
            ready_s = time.perf_counter() - server.started
            page.goto(server.url)
            wait_for_picture(page, "Red", timeout_s=300)
            first_picture_s = time.perf_counter() - server.started
            wait_for_text(page, "#status", "^loaded", timeout_s=120)
            loaded_mib = rss_mib(server.process.pid)
            started = time.perf_counter()
            page.click("#compute")
            status = wait_for_text(page, "#status", "^features of|^stopped|^failed", timeout_s=900)
            features_s = time.perf_counter() - started
            if not status.startswith("features of"):
                raise RuntimeError(f"compute failed: {page.inner_text('#error')}")
            rows = []
            for n in range(clicks):
                answer = timed_click(page, "Red", 0.35 + 0.3 * (n % 4) / 3, 0.4 + 0.2 * (n // 4 % 2), timeout_s=120)
                times = SERVER_TIMES.search(answer["answer"])
                rows.append([*(float(v) for v in times.groups()), answer["answer_ms"] / 1e3,
                             answer["picture_ms"] / 1e3])
            return {"setting": setting or "(default)", "ready_s": ready_s, "first_picture_s": first_picture_s,
                    "features_s": features_s, "loaded_mib": loaded_mib, "after_mib": rss_mib(server.process.pid),
                    "model": page.inner_text("#model-info"), "clicks": np.array(rows)}


def report(run: dict) -> None:
    clicks = run["clicks"]
    print(f"\n{run['setting']}, {run['code']}: {run['model']}")
    print(f"  start -> address printed {run['ready_s']:.1f} s; -> first axial slice in Chromium "
          f"{run['first_picture_s']:.1f} s; features + PCA {run['features_s']:.1f} s")
    print(f"  server RSS: volume shown {run['loaded_mib']:.0f} MiB; after features, PCA, {len(clicks)} clicks "
          f"{run['after_mib']:.0f} MiB")
    names = ("map (Logic)", "show (MRML)", "server total", "click->report", "click->picture")
    print("  per click:            first   median of the rest   all")
    for column, name in enumerate(names):
        rest = clicks[1:, column] if len(clicks) > 1 else clicks[:, column]
        print(f"    {name:15s} {clicks[0, column]:6.3f} s {np.median(rest):10.3f} s        "
              + " ".join(f"{v:.2f}" for v in clicks[:, column]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=6)
    parser.add_argument("--setting", action="append", default=None,
                        help="extra `braindino serve` options of one run (repeat for more runs)")
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit to run each setting with first")
    parser.add_argument("--smoke", action="store_true", help="one run at 12 mm with two clicks")
    args = parser.parse_args()
    reason = missing_browser()
    if reason:
        sys.exit(f"web_speed: cannot run: {reason}")
    default = ["", "--upsampling bilinear"]
    settings = ["--patch-mm 12 --upsampling bilinear"] if args.smoke else (args.setting or default)
    clicks = 2 if args.smoke else args.clicks
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for setting in settings:
        for code in ([args.baseline] if args.baseline else []) + [None]:
            report(one_run(setting, clicks, code))


if __name__ == "__main__":
    main()
