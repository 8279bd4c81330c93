"""`ChildProcess` (long jobs in a child process, read on a thread, no Qt) and the `--progress-lines` protocol the
Slicer module and the web page read from `braindino` commands; the Logic's module imports nothing heavy."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from BrainDINOLib.process import PROGRESS_PREFIX, ChildProcess, braindino_command


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def poll_until_finished(process: ChildProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while process.poll():
        assert time.monotonic() < deadline, f"{process.describe()} did not finish"
        time.sleep(0.02)


def test_lines_progress_and_exit_code_arrive_in_order_on_the_polling_thread():
    events = []
    process = ChildProcess(
        python(f"""
            import json, sys
            print("first line")
            print({PROGRESS_PREFIX!r} + json.dumps({{"stage": "features", "done": 1, "total": 2}}))
            print("warning on stderr", file=sys.stderr)
            print({PROGRESS_PREFIX!r} + "not json: shown as a line")
            sys.exit(3)
        """),
        on_line=lambda line: events.append(("line", line)), on_finished=lambda code: events.append(("exit", code)),
        on_progress=lambda stage, done, total: events.append(("progress", stage, done, total)))
    poll_until_finished(process)
    assert events == [("line", "first line"), ("progress", "features", 1, 2), ("line", "warning on stderr"),
                      ("line", PROGRESS_PREFIX + "not json: shown as a line"), ("exit", 3)]
    assert process.exit_code == 3 and not process.running and not process.cancelled
    assert process.poll() is False and events[-1] == ("exit", 3)  # reported once


def test_kill_ends_the_whole_process_tree():
    """Cancel must stop what the command started too (torchrun workers, data loaders), not only the launcher."""
    lines = []
    process = ChildProcess(python(f"""
        import subprocess, sys, time
        child = subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        time.sleep(600)
    """), on_line=lines.append)
    deadline = time.monotonic() + 60
    while not lines:
        process.poll()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = psutil.Process(int(lines[0]))
    process.kill()
    assert process.wait(timeout=30) != 0 and process.cancelled
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


def test_a_missing_program_is_one_sentence():
    from BrainDINOLib.errors import BrainDINOError

    with pytest.raises(BrainDINOError, match=r"/no/such/program: could not be started"):
        ChildProcess(["/no/such/program"])


def test_braindino_reports_progress_as_lines(tmp_path):
    """`braindino --progress-lines make-cases ...` (a real command, tiny): progress arrives as data, not a bar."""
    progress, lines = [], []
    process = ChildProcess(braindino_command("make-cases", ["--task", "tissue", "--out", str(tmp_path / "cases"),
                                                            "--train", "2", "--test", "0", "--spacing", "8"],
                                             progress_lines=True),
                           on_line=lines.append, on_progress=lambda *report: progress.append(report))
    assert process.wait(timeout=300) == 0, "\n".join(lines)
    assert progress == [("cases", 1, 2), ("cases", 2, 2)]
    assert any("wrote 2 training and 0 test tissue cases" in line for line in lines)
    assert not any(line.startswith(PROGRESS_PREFIX) for line in lines)


def test_the_logic_module_imports_without_torch_or_slicer():
    """A front end imports the Logic before dependencies are installed (Slicer) or to start fast (web page)."""
    code = ("import sys, BrainDINOLib.logic, BrainDINOLib.dependencies; "
            "print(json.dumps(sorted(m for m in ('torch', 'SimpleITK', 'slicer', 'vtk', 'qt', 'numpy') "
            "if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
