"""`braindino embed-cohort`: every volume of a manifest or folder into a resumable feature store, in one process,
in several on this machine (`--nproc-per-node`, which starts torchrun), or on several nodes under a torchrun you
start yourself with the same command line (`torchrun ... -m BrainDINOLib.cli embed-cohort ...`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import BrainDINOError
from .common import (add_model_options, comma_list, declare_files, int_between, parse_layers, policy_from_args,
                     tqdm_progress)

PLAIN_PROGRESS_INTERVAL_S = 30.0  # a progress line at most this often when stderr is not a terminal


class PlainProgress:
    """Progress as a line on stdout now and then (logs, batch jobs): volumes done, rate and time left."""

    def __init__(self, interval_s: float = PLAIN_PROGRESS_INTERVAL_S):
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.last = (-1.0, -1)  # (time, count) of the last line

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done in (0, self.last[1]) or (done < total and now - self.last[0] < self.interval_s):
            return
        self.last = (now, done)
        rate = done / max(now - self.started, 1e-9) * 60
        left = f", about {(total - done) / rate:.0f} min left" if 0 < done < total else ""
        share = 100 * done / max(total, 1)
        print(f"embed-cohort: {done}/{total} volumes ({share:.0f} %), {rate:.1f} volumes/min{left}", flush=True)


def cohort_progress() -> tuple[Callable[[int, int], None], contextlib.AbstractContextManager]:
    """Progress of the whole cohort: a tqdm bar on a terminal, plain lines on stdout otherwise."""
    if sys.stderr.isatty():
        return tqdm_progress("embedding the cohort", unit="volume")
    return PlainProgress(), contextlib.nullcontext()


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, leave_out: Iterable[str]) -> list[str]:
    """`args` as a command line of `parser` again (options at their defaults and `leave_out` omitted): what the
    launcher hands every torchrun process."""
    words = []
    for action in parser._actions:
        if action.dest in leave_out or isinstance(action, argparse._HelpAction):
            continue
        value = getattr(args, action.dest, action.default)
        text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
        if not action.option_strings:
            words.append(text)
        elif value != action.default:
            words.append(action.option_strings[-1] if action.nargs == 0 else f"{action.option_strings[-1]}={text}")
    return words


def _refuse_skipped(args: argparse.Namespace, skipped: int, images: int) -> None:
    if args.strict and skipped:
        raise BrainDINOError(args.out / "index.json", f"{skipped} of {images} image(s) could not be embedded "
                                                      "(--strict); they are listed above and in this index")


def _embed_here(args: argparse.Namespace, cohort) -> int:
    """This process embeds its share: the only one, or one of the processes torchrun started."""
    from ..cohort import embed_cohort
    from ..cohort.run import default_workers, die_with_parent
    from ..distributed import setup_distributed, teardown_distributed
    from ..encoder import load_encoder
    from ..session import FeatureSession

    if "WORLD_SIZE" in os.environ:  # started by torchrun: end with it
        die_with_parent(os.getppid())
    distributed = setup_distributed(args.device)
    try:
        encoder = load_encoder(args.model, device=distributed.device, precision=args.precision)
        session = FeatureSession.for_encoder(encoder, policy_from_args(args, encoder.device.type),
                                             batch_size=args.batch_size)
        workers = args.workers if args.workers is not None else \
            default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        progress, display = cohort_progress() if distributed.is_main else (None, contextlib.nullcontext())
        if distributed.is_main:
            print(f"features: {session.describe()}; {distributed.world_size} process(es), {workers} reading "
                  "worker(s) each", flush=True)
        with display:
            summary = embed_cohort(cohort, args.out, session, args.layers, distributed, workers, progress)
    finally:
        teardown_distributed()
    if summary is not None:
        print(summary.describe())
        _refuse_skipped(args, len(summary.skipped), summary.images)
    return 0


def _launch(args: argparse.Namespace, cohort) -> int:
    """Check the cohort and the store here (one line, before any process starts), then run torchrun on this
    machine with the same command line, one process per `--nproc-per-node`."""
    from ..checkpoints import read_checkpoint
    from ..cohort import FeatureStore, cohort_identity, plan_run
    from ..cohort.run import summarise
    from ..encoder import select_device
    from ..inference import resolve_precision

    started = time.perf_counter()
    checkpoint = read_checkpoint(args.model)
    device = select_device(args.device)
    policy = policy_from_args(args, device.type)
    identity = cohort_identity(checkpoint, resolve_precision(args.precision, device), policy, args.layers)
    with FeatureStore.filling(args.out, identity) as store:  # released before torchrun's rank 0 takes it
        plan = plan_run(store, cohort)
    if plan.pending:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc_per_node}", "-m", "BrainDINOLib.cli",
                   *(["--verbose"] if args.verbose else []), "embed-cohort",
                   *command_line(args.command_parser, args, {"nproc_per_node", "strict"})]
        threads = str(max(1, (os.cpu_count() or 1) // args.nproc_per_node))  # the cores shared out (torch's own)
        code = subprocess.run(command, env={"OMP_NUM_THREADS": threads, **os.environ}, check=False).returncode
        if code:
            return code
    else:
        print(summarise(plan, [], time.perf_counter() - started, 1).describe())
    entries = FeatureStore.open(args.out).entries()
    _refuse_skipped(args, sum(e["status"] == "skipped" for e in entries), len(entries))
    return 0


def run_embed_cohort(args: argparse.Namespace) -> int:
    from ..atomic import refuse_output_over_input
    from ..cohort import read_cohort

    cohort = read_cohort(args.cohort, args.image_columns)
    refuse_output_over_input([args.out], cohort.volumes)  # e.g. a store inside a DICOM series folder it reads
    if args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, cohort)
    return _embed_here(args, cohort)


def register(commands: argparse._SubParsersAction) -> None:
    cohort = commands.add_parser("embed-cohort", help="embed every volume of a manifest or folder into a resumable "
                                                      "feature store (processes, GPUs, nodes: torchrun)")
    cohort.add_argument("cohort", type=Path, help="CSV manifest (one row per case, as for fit-head) or a folder of "
                                                  "volumes (searched recursively)")
    cohort.add_argument("--out", required=True, type=Path,
                        help="store folder: new, or a store to complete (the same command resumes a killed run)")
    cohort.add_argument("--image-columns", type=comma_list, default=(),
                        help="manifest image column(s) to embed (default: `image`, else every `image_*` column)")
    cohort.add_argument("--layers", type=parse_layers, default=None,
                        help="intermediate blocks to keep, e.g. 2,5,8,11 (default: the blocks segmentation reads; "
                             "'' for none)")
    cohort.add_argument("--nproc-per-node", type=int_between(1), default=1,
                        help="processes on this machine (>1 runs torchrun --standalone: one per GPU, or several on a "
                             "CPU); for several nodes run torchrun -m BrainDINOLib.cli embed-cohort yourself")
    cohort.add_argument("--workers", type=int_between(0), default=None,
                        help="DataLoader workers per process that read and preprocess volumes while the device "
                             "embeds (default: the cores shared out, 1 to 4; 0 reads in the process itself)")
    cohort.add_argument("--strict", action="store_true",
                        help="exit with code 2 if any image could not be embedded (skipped images are listed and "
                             "indexed either way)")
    add_model_options(cohort, cache=False)
    cohort.set_defaults(run=run_embed_cohort, command_parser=cohort)
    declare_files(cohort, inputs={"cohort": "manifest file or folder"}, outputs={"out": "folder"})
