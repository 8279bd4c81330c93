"""Dependencies in Slicer's Python: one requirements file, one torch requirement consistent with everything that
needs torch, and installing after one question, where a decline or a failure is a calm state."""
from __future__ import annotations

import importlib.metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from BrainDINOLib.dependencies import DependencyInstaller, Requirements

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REQUIREMENTS = REPO / "BrainDINO" / "Resources" / "requirements.txt"
SLICER_SHIPS = {"simpleitk", "numpy"}  # Slicer's own: never installed into it


def pyproject_dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}


def lowest_allowed(requirement: Requirement) -> Version:
    """The lowest version a `>=` bound allows (the only form the torch lines use)."""
    (bound,) = [s for s in requirement.specifier if s.operator == ">="]
    return Version(bound.version)


def test_slicer_requirements_are_the_projects_dependencies():
    requirements = Requirements.read(REQUIREMENTS)
    ours = {r.name.lower(): r for r in [*requirements.torch, *requirements.packages]}
    project = pyproject_dependencies()
    assert set(ours) == set(project) - SLICER_SHIPS
    for name, requirement in ours.items():
        if name in ("torch", "torchvision"):  # pinned for the CLI and tests; a lower bound in Slicer
            assert project[name].specifier.contains(next(iter(project[name].specifier)).version)
            assert requirement.specifier.contains(next(iter(project[name].specifier)).version), \
                f"pyproject's {project[name]} is outside Slicer's {requirement}"
        else:
            assert requirement.specifier == project[name].specifier, f"{requirement} vs pyproject's {project[name]}"


def test_one_torch_requirement_satisfies_every_package_that_needs_torch():
    """PyTorchUtils gets the torch line; if any package pip installs wanted a newer torch than that line allows,
    pip would replace the PyTorchUtils build. So the line's lowest version must satisfy all of them."""
    requirements = Requirements.read(REQUIREMENTS)
    torch_line = next(r for r in requirements.torch if r.name == "torch")
    lowest = lowest_allowed(torch_line)
    checked = []
    for requirement in requirements.packages:
        for needed in importlib.metadata.requires(requirement.name) or []:
            needed = Requirement(needed)
            if needed.name == "torch" and (needed.marker is None or needed.marker.evaluate({"extra": ""})):
                assert needed.specifier.contains(lowest), f"{requirement.name} needs {needed}, but Slicer may get " \
                                                          f"torch {lowest} from {torch_line}"
                checked.append(requirement.name)
    assert "monai" in checked  # MONAI states its torch requirement: the reason the line is >= 2.8
    assert requirements.specifier("torch") == str(torch_line.specifier)
    assert requirements.specifier("torchvision").startswith(">=")


def test_installed_torch_is_pinned_for_pip():
    constraints = Requirements.read(REQUIREMENTS).torch_constraints()
    assert constraints == [f"torch=={importlib.metadata.version('torch')}",
                           f"torchvision=={importlib.metadata.version('torchvision')}"]


def fake_requirements(tmp_path, lines: str) -> Requirements:
    path = tmp_path / "requirements.txt"
    path.write_text(lines)
    return Requirements.read(path)


class Recorder:
    """What the front end was asked and told to install."""

    def __init__(self, answer: bool = True, torch_installs: bool = True, pip_error: Exception | None = None):
        self.answer, self.torch_installs, self.pip_error = answer, torch_installs, pip_error
        self.questions, self.torch, self.pip = [], [], []

    def confirm(self, question: str, details: str) -> bool:
        self.questions.append((question, details))
        return self.answer

    def install_torch(self, torch: str, torchvision: str) -> bool:
        self.torch.append((torch, torchvision))
        return self.torch_installs

    def install_packages(self, requirements: list[str], constraints: list[str]) -> None:
        self.pip.append((requirements, constraints))
        if self.pip_error:
            raise self.pip_error

    def installer(self, requirements: Requirements) -> DependencyInstaller:
        return DependencyInstaller(requirements, self.confirm, self.install_torch, self.install_packages)


def test_nothing_missing_asks_nothing(tmp_path):
    recorder = Recorder()
    state = recorder.installer(fake_requirements(tmp_path, "torch>=2.8\nnumpy>=1\n")).ensure()
    assert state.ready and not recorder.questions and not recorder.pip


def test_one_question_for_everything_then_torch_first(tmp_path):
    requirements = fake_requirements(tmp_path, "torch>=999\nbraindino-no-such-a>=1\nbraindino-no-such-b\n")
    recorder = Recorder()
    state = recorder.installer(requirements).ensure()
    assert len(recorder.questions) == 1
    question, details = recorder.questions[0]
    assert "3 Python package(s)" in question and "PyTorch extension" in question
    assert details.splitlines() == [f"torch>=999 (installed: {importlib.metadata.version('torch')})",
                                    "braindino-no-such-a>=1", "braindino-no-such-b"]
    assert recorder.torch == [(">=999", "")]
    # pip gets the rest with the installed torch pinned, so it cannot swap PyTorch for another build.
    assert recorder.pip == [(["braindino-no-such-a>=1", "braindino-no-such-b"],
                             [f"torch=={importlib.metadata.version('torch')}"])]
    # Nothing was really installed: the state says what is still missing, it does not raise.
    assert not state.ready and state.message.startswith("still missing after installing: torch>=999")


def test_a_decline_is_a_state_not_an_error(tmp_path):
    recorder = Recorder(answer=False)
    state = recorder.installer(fake_requirements(tmp_path, "braindino-no-such-package>=1\n")).ensure()
    assert not state.ready and not recorder.pip
    assert state.message == ("not installed: BrainDINO needs braindino-no-such-package>=1 (you declined installing "
                             "them)")


@pytest.mark.parametrize("recorder, expected", [
    (Recorder(torch_installs=False), "not installed: PyTorch was not installed"),
    (Recorder(pip_error=RuntimeError("pip failed: no matching distribution\nmore lines")),
     "installing failed: pip failed: no matching distribution"),
])
def test_a_failed_install_is_one_sentence(tmp_path, recorder, expected):
    state = recorder.installer(fake_requirements(tmp_path, "torch>=999\nbraindino-no-such-package\n")).ensure()
    assert not state.ready and state.message == expected


def test_a_bad_requirements_line_names_the_file_and_line(tmp_path):
    from BrainDINOLib.errors import BrainDINOError

    with pytest.raises(BrainDINOError, match=r"requirements.txt: line 2: "):
        fake_requirements(tmp_path, "timm>=1\ntimm>>1\n")
