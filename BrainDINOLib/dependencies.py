"""What BrainDINO needs in a Python environment it does not own (Slicer's), what is missing, and installing it
after asking once.

One requirements file is the single source: its `torch`/`torchvision` lines go to whoever installs PyTorch
(Slicer's PyTorch extension, matched to the GPU driver), everything else to pip. The torch lines must satisfy
every other requirement's own need for torch (MONAI's, above all): otherwise pip would replace the PyTorch
build that was chosen for the GPU with a default one. `Testing/test_dependencies.py` holds that rule.

`DependencyInstaller` asks one question for everything that is missing, installs PyTorch first, then the rest,
and reports a decline or a failure as a state with one sentence, never as an exception: the user interface
shows "not installed" and stays usable. The questions and installers are injected, so the same policy serves
Slicer (dialogs, PyTorchUtils, slicer.packaging) and any other front end.
"""
from __future__ import annotations

import importlib.metadata
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from .errors import BrainDINOError

log = logging.getLogger(__name__)

TORCH_PACKAGES = ("torch", "torchvision")


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(requirement: Requirement) -> bool:
    """The requirement's distribution is missing, or installed at a version outside its specifier."""
    if requirement.marker is not None and not requirement.marker.evaluate():
        return False
    version = _installed_version(requirement.name)
    return version is None or (bool(requirement.specifier) and not requirement.specifier.contains(version,
                                                                                                 prereleases=True))


@dataclass(frozen=True)
class Requirements:
    """The requirements of one file, split into PyTorch's and pip's."""

    torch: tuple[Requirement, ...]
    packages: tuple[Requirement, ...]

    @classmethod
    def read(cls, path: str | Path) -> Requirements:
        """Read a requirements.txt (comments, blank lines and `-` option lines are skipped)."""
        path = Path(path)
        requirements = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text or text.startswith("-"):
                continue
            try:
                requirements.append(Requirement(text))
            except InvalidRequirement as error:
                raise BrainDINOError(path, f"line {number}: {error}") from None
        torch = tuple(r for r in requirements if r.name in TORCH_PACKAGES)
        return cls(torch, tuple(r for r in requirements if r.name not in TORCH_PACKAGES))

    def specifier(self, name: str) -> str:
        """The version specifier of `torch` or `torchvision` as PyTorchUtils takes it (e.g. ">=2.8")."""
        return next((str(r.specifier) for r in self.torch if r.name == name), "")

    def torch_constraints(self) -> list[str]:
        """Pins of the PyTorch packages installed now, for pip: a package that needs another torch then fails to
        install instead of replacing the build PyTorchUtils chose for this machine's GPU."""
        return [f"{r.name}=={version}" for r in self.torch if (version := _installed_version(r.name))]

    def missing_torch(self) -> list[Requirement]:
        return [r for r in self.torch if unmet(r)]

    def missing_packages(self) -> list[Requirement]:
        return [r for r in self.packages if unmet(r)]


@dataclass(frozen=True)
class DependencyState:
    """The outcome of `DependencyInstaller.ensure`: `ready`, or why not in one sentence."""

    ready: bool
    message: str
    restart_needed: bool = False


def describe(requirements: Sequence[Requirement]) -> list[str]:
    """One line per requirement, naming the version installed now where there is one."""
    lines = []
    for requirement in requirements:
        installed = _installed_version(requirement.name)
        lines.append(f"{requirement} (installed: {installed})" if installed else str(requirement))
    return lines


class DependencyInstaller:
    """Install what `requirements` lack, after one `confirm(question, details)`.

    `install_torch(torch_specifier, torchvision_specifier)` returns False when it did not install (it may say
    why by raising `BrainDINOError`, e.g. the PyTorch extension is missing). `install_packages(requirements,
    constraints)` installs pip requirement lines under constraint lines (the installed torch, pinned) and raises
    on failure.
    """

    def __init__(self, requirements: Requirements, confirm: Callable[[str, str], bool],
                 install_torch: Callable[[str, str], bool],
                 install_packages: Callable[[list[str], list[str]], None],
                 requester: str = "BrainDINO"):
        self.requirements = requirements
        self.confirm, self.install_torch, self.install_packages = confirm, install_torch, install_packages
        self.requester = requester

    def ensure(self) -> DependencyState:
        """Everything installed (asking first), or the state that says why not."""
        torch, packages = self.requirements.missing_torch(), self.requirements.missing_packages()
        if not torch and not packages:
            return DependencyState(True, "dependencies installed")
        details = "\n".join(describe([*torch, *packages]))
        question = (f"{self.requester} needs {len(torch) + len(packages)} Python package(s) that this Python lacks. "
                    "Download and install them now? PyTorch alone is about 2 GB and can take several minutes.")
        if torch:
            question += " PyTorch is installed through the PyTorch extension, matched to your graphics driver."
        if not self.confirm(question, details):
            return DependencyState(False, f"not installed: {self.requester} needs " + ", ".join(
                str(r) for r in [*torch, *packages]) + " (you declined installing them)")
        torch_was_imported = "torch" in sys.modules
        try:
            if torch and not self.install_torch(self.requirements.specifier("torch"),
                                                self.requirements.specifier("torchvision")):
                return DependencyState(False, "not installed: PyTorch was not installed")
            still_missing = self.requirements.missing_packages()
            if still_missing:
                self.install_packages([str(r) for r in still_missing], self.requirements.torch_constraints())
        except BrainDINOError as error:
            return DependencyState(False, f"not installed: {error}")
        except Exception as error:  # pip or the PyTorch installer failed: say so, keep the interface usable
            log.exception("installing %s's dependencies failed", self.requester)
            first_line = str(error).splitlines()[0] if str(error) else repr(error)
            return DependencyState(False, f"installing failed: {first_line}")
        importlib.invalidate_caches()
        missing = [*self.requirements.missing_torch(), *self.requirements.missing_packages()]
        if missing:
            return DependencyState(False, "still missing after installing: " + ", ".join(describe(missing)))
        if torch and torch_was_imported:
            return DependencyState(True, "PyTorch was updated: restart to use it", restart_needed=True)
        return DependencyState(True, "dependencies installed")
