"""What of the Slicer module can be checked without Slicer: the .ui file, the widget code that uses it,
the parameter node it binds to, and the files CMake ships all agree."""
import re
import xml.etree.ElementTree as ET

from conftest import REPO

MODULE = REPO / "BrainDINO"
UI = MODULE / "Resources" / "UI" / "BrainDINO.ui"
SOURCE = (MODULE / "BrainDINO.py").read_text()


def _ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).iter("widget")}


def test_every_widget_the_code_uses_exists_in_the_ui_file():
    used = set(re.findall(r"\bui\.([A-Za-z_][A-Za-z0-9_]*)", SOURCE))
    assert used, "the widget uses no ui elements?"
    missing = used - set(_ui_widgets())
    assert not missing, f"BrainDINO.py uses widgets that BrainDINO.ui does not define: {sorted(missing)}"


def test_every_bound_parameter_exists_in_the_parameter_node():
    node_block = SOURCE.split("class BrainDINOParameterNode:", 1)[1].split("\n\n", 1)[0]
    parameters = set(re.findall(r"^\s+([A-Za-z_][A-Za-z0-9_]*)\s*:", node_block, flags=re.M))
    bound = {prop.find("string").text for w in _ui_widgets().values() for prop in w.findall("property")
             if prop.get("name") == "SlicerParameterName"}
    assert bound, "no widget is bound to the parameter node"
    assert bound <= parameters, f"ui binds unknown parameters: {sorted(bound - parameters)}"


def test_cmake_ships_every_script_and_resource_that_exists():
    cmake = (MODULE / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "BrainDINO")
    listed = set(re.findall(r"^\s+([\w/.-]+\.(?:py|png|ui|txt))\s*$", cmake, flags=re.M))
    assert "BrainDINO.py" in listed
    for path in listed:
        assert (MODULE / path).is_file(), f"CMakeLists.txt lists {path}, which does not exist"
    resources = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert resources <= listed, f"resources not shipped: {sorted(resources - listed)}"


def test_ui_and_widget_code_use_only_what_slicer_5_12_widgets_have():
    """Slicer's widget API checker (../shared/slicer-python/check_ui.py): every property, enum value, .ui
    connection and connect('signal(args)') string must exist in Slicer 5.12.3, its CTK and Qt 5.15."""
    import subprocess
    import sys

    import pytest

    checker = REPO.parent / "shared" / "slicer-python" / "check_ui.py"
    if not checker.is_file():
        pytest.skip(f"Slicer's widget API checker is not at {checker} (../shared is absent)")
    result = subprocess.run([sys.executable, str(checker), str(UI), str(checker.with_name("widget-api.json")),
                             str(MODULE / "BrainDINO.py")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout and "OK=" in result.stdout
