"""Slicer's own pure-Python module framework (`../shared/slicer-python/<version>/slicer`: ScriptedLoadableModule,
parameterNodeWrapper, util, i18n, exactly as released) on the real MRML of the slicer-core wheel, for importing
and driving `BrainDINO/BrainDINO.py` the way Slicer does.

What PythonQt would provide is stood in for here, and only that:
- `qt` and `ctk` widget classes, and the `slicer.q*` widget classes: Python objects whose properties and signals
  are read from `widget-api.json` (Slicer 5.12.3, its CTK, Qt 5.15), so touching a property or connecting a
  signal that Slicer lacks raises AttributeError. Behaviour is written out only where Slicer's parameter-node
  connectors or the module rely on it: values that emit their change signal, combo-box items, a node combo box
  choosing among the scene's nodes of its `nodeTypes`, the markups place widget's place button, a timer that
  ticks only when a test calls `tick()`, a table of text items, a file dialog that answers what a test set.
- `qt.QUiLoader`: builds those widgets from the .ui XML (widget tree, properties, dynamic `SlicerParameterName`
  properties, `<connections>`).
- `qt.QSettings` (empty: no developer mode), `qt.QIcon`, `qt.QFile`, enum namespaces (`qt.Qt`, `qt.QMessageBox`).
- `slicer.app`: version numbers, testing mode on (so `slicer.util` logs instead of showing message boxes, and
  confirmation dialogs answer OK), a module manager and `connect` that record connections.
- `slicer.modules.<name>.path`, as Slicer's module factory sets it.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import re
import sys
import types
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import slicer

from conftest import REPO

SLICER_PYTHON = REPO.parent / "shared" / "slicer-python"
WIDGET_API = SLICER_PYTHON / "widget-api.json"
VERSIONS = ("v5.10.0", "v5.12.3")
FRAMEWORK_MODULES = ("util", "i18n", "ScriptedLoadableModule", "parameterNodeWrapper", "testing")


# ---- the widget API -------------------------------------------------------------------------------------------

class WidgetApi:
    """Properties and signals of a Qt class and its bases, from widget-api.json."""

    def __init__(self, path: Path):
        data = json.loads(path.read_text())
        self.classes = {**data["qt"]["classes"], **{k: v for k, v in data.items() if k not in ("_meta", "qt")}}
        self._cache: dict[str, tuple[set[str], set[str]]] = {}

    def members(self, name: str) -> tuple[set[str], set[str]]:
        """(property names, signal names) of `name` and its bases."""
        if name not in self._cache:
            properties, signals = set(), set()
            walk = name
            while walk in self.classes:
                entry = self.classes[walk]
                properties |= set(entry.get("properties", ()))
                signals |= {s.split("(", 1)[0] for s in entry.get("signals", ())}
                walk = entry.get("base")
            self._cache[name] = (properties, signals)
        return self._cache[name]


API = WidgetApi(WIDGET_API) if WIDGET_API.is_file() else None


# ---- signals and widgets --------------------------------------------------------------------------------------

class Signal:
    """A Qt signal as PythonQt shows it: connect/disconnect/emit; slots may take fewer arguments than sent."""

    def __init__(self):
        self.slots: list = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def disconnect(self, slot=None) -> None:
        self.slots = [] if slot is None else [s for s in self.slots if s != slot]

    def emit(self, *args) -> None:
        for slot in list(self.slots):
            slot(*args[:_positional_count(slot, len(args))])


def _positional_count(slot, available: int) -> int:
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


SIGNATURE = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")


class StandInObject:
    """A QObject stand-in: properties and signals checked against the widget API of `qt_class`."""

    qt_class = "QObject"
    defaults: dict = {}

    def __init__(self, *args, parent=None, **properties):
        object.__setattr__(self, "_values", {"enabled": True, "visible": True, **self.defaults})
        object.__setattr__(self, "_dynamic", {})
        object.__setattr__(self, "_signals", {})
        object.__setattr__(self, "_children", [])
        object.__setattr__(self, "_parent", None)
        object.__setattr__(self, "name", "")
        parent = parent or next((a for a in args if isinstance(a, StandInObject)), None)
        if parent is not None:
            parent.adopt(self)
        text = next((a for a in args if isinstance(a, str)), None)
        if text is not None:
            self.text = text
        for key, value in properties.items():
            setattr(self, key, value)

    # properties and signals
    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        properties, signals = API.members(self.qt_class)
        if name in signals:
            return self._signals.setdefault(name, Signal())
        if name in properties:
            return self._values.get(name)
        raise AttributeError(f"{self.qt_class} has no property or signal {name!r} (nor a stand-in method)")

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_") or name in ("name", "objectName") or isinstance(
                getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
            return
        properties, _ = API.members(self.qt_class)
        if name not in properties:
            raise AttributeError(f"{self.qt_class} has no property {name!r} in Slicer 5.12.3's widget API")
        previous = self._values.get(name)
        self._values[name] = value
        if previous != value:
            self.changed(name, value)

    def changed(self, name: str, value) -> None:
        """A property changed: emit what Qt emits (subclasses)."""

    def property(self, name: str):
        return self._dynamic.get(name, self._values.get(name))

    def setProperty(self, name: str, value) -> None:
        self._dynamic[name] = value

    def connect(self, signature: str, slot) -> None:
        getattr(self, _signal_name(self, signature)).connect(slot)

    def disconnect(self, signature: str, slot=None) -> None:
        getattr(self, _signal_name(self, signature)).disconnect(slot)

    # the object tree
    def adopt(self, child: StandInObject) -> None:
        if child._parent is not None:
            child._parent._children.remove(child)
        object.__setattr__(child, "_parent", self)
        self._children.append(child)

    def parent(self):
        return self._parent

    def children(self) -> list:
        return list(self._children)

    def findChildren(self, cls) -> list:
        found = []
        for child in self._children:
            if isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found

    def isWidgetType(self) -> bool:
        return isinstance(self, QWidget)

    def deleteLater(self) -> None:
        if self._parent is not None:
            self._parent._children.remove(self)
            object.__setattr__(self, "_parent", None)

    def __repr__(self) -> str:
        return f"<stand-in {self.qt_class} {self.name!r}>"


def _signal_name(obj: StandInObject, signature: str) -> str:
    match = SIGNATURE.match(signature)
    if not match:
        raise ValueError(f"{signature!r} is not a Qt signal signature")
    _, signals = API.members(obj.qt_class)
    if match.group(1) not in signals:
        raise AttributeError(f"{obj.qt_class} has no signal {signature!r} in Slicer 5.12.3's widget API")
    return match.group(1)


class Layout:
    """A layout: adding a widget makes it a child of the layout's widget."""

    def __init__(self, widget=None):
        self.widget = None
        if isinstance(widget, StandInObject):
            widget.setLayout(self)

    def addWidget(self, widget, *args) -> None:
        if self.widget is not None:
            self.widget.adopt(widget)

    def addRow(self, *items) -> None:
        for item in items:
            if isinstance(item, StandInObject):
                self.addWidget(item)

    def addLayout(self, layout, *args) -> None:
        layout.widget = self.widget

    def addStretch(self, *args) -> None:
        pass


class QWidget(StandInObject):
    qt_class = "QWidget"

    def layout(self):
        return self._dynamic.get("__layout")

    def setLayout(self, layout: Layout) -> None:
        layout.widget = self
        self._dynamic["__layout"] = layout

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def isVisible(self) -> bool:
        return bool(self.visible)

    def setMRMLScene(self, scene) -> None:
        """For the MRML widgets (they have this slot): keep the scene and say so, as qMRMLWidget does."""
        self._dynamic["__scene"] = scene
        _, signals = API.members(self.qt_class)
        if "mrmlSceneChanged" in signals:
            self.mrmlSceneChanged.emit(scene)
        self.sceneChanged(scene)

    def mrmlScene(self):
        return self._dynamic.get("__scene")

    def sceneChanged(self, scene) -> None:
        """The widget got a scene (subclasses)."""


class AbstractButton(QWidget):
    qt_class = "QAbstractButton"
    defaults = {"checked": False}

    def click(self) -> None:
        if self.checkable:
            self.checked = not self.checked
        self.clicked.emit(bool(self.checked))

    def changed(self, name, value) -> None:
        if name == "checked":
            self.toggled.emit(bool(value))
            if self.qt_class == "QCheckBox":
                self.stateChanged.emit(2 if value else 0)


class ValueWidget(QWidget):
    """Spin boxes and sliders: a value clamped to [minimum, maximum], `valueChanged` on change."""

    defaults = {"minimum": 0, "maximum": 99, "value": 0}

    def changed(self, name, value) -> None:
        if name in ("minimum", "maximum"):
            self.value = min(max(self.value, self.minimum), self.maximum)
        elif name == "value":
            clamped = min(max(value, self.minimum), self.maximum)
            if clamped != value:
                self.value = clamped
            else:
                self.valueChanged.emit(value)

    def setRange(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def setMinimum(self, minimum) -> None:
        self.minimum = minimum

    def setMaximum(self, maximum) -> None:
        self.maximum = maximum

    def setValue(self, value) -> None:
        self.value = value


class QComboBox(QWidget):
    qt_class = "QComboBox"
    defaults = {"currentIndex": -1}

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_items", [])
        super().__init__(*args, **kwargs)

    def addItem(self, text, *args) -> None:
        self._items.append(str(text))
        if self.currentIndex == -1:
            self.currentIndex = 0

    def clear(self) -> None:
        self._items.clear()
        self.currentIndex = -1

    def findText(self, text) -> int:
        return self._items.index(text) if text in self._items else -1

    def setCurrentIndex(self, index) -> None:
        self.currentIndex = index

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentText(self) -> str:
        return self._items[self.currentIndex] if 0 <= self.currentIndex < len(self._items) else ""

    def changed(self, name, value) -> None:
        if name == "currentIndex":
            self.currentIndexChanged.emit(value)


class qMRMLNodeComboBox(QWidget):
    """Chooses among the scene's nodes of `nodeTypes`; with `noneEnabled` False it picks the first one."""

    qt_class = "qMRMLNodeComboBox"
    defaults = {"nodeTypes": [], "noneEnabled": False}

    def currentNode(self):
        return self._dynamic.get("__node")

    def setCurrentNode(self, node) -> None:
        if isinstance(node, str):
            node = self.mrmlScene().GetNodeByID(node) if self.mrmlScene() else None
        if node is not None and not any(node.IsA(t) for t in self.nodeTypes):
            raise TypeError(f"{self.name}: a {node.GetClassName()} is not one of {self.nodeTypes}")
        if node is not self.currentNode():
            self._dynamic["__node"] = node
            self.currentNodeChanged.emit(node)

    def setCurrentNodeID(self, node_id: str) -> None:
        self.setCurrentNode(node_id)

    @property
    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    def nodes(self) -> list:
        scene = self.mrmlScene()
        if scene is None:
            return []
        return [n for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
                if any(n.IsA(t) for t in self.nodeTypes)]

    def sceneChanged(self, scene) -> None:
        if not self.noneEnabled and self.currentNode() is None and self.nodes():
            self.setCurrentNode(self.nodes()[0])


class qSlicerMarkupsPlaceWidget(QWidget):
    """The place button (and the delete button) that `buttonsVisible` hides."""

    qt_class = "qSlicerMarkupsPlaceWidget"
    defaults = {"buttonsVisible": True}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_place", widget_class("QToolButton")(parent=self))
        object.__setattr__(self, "_delete", widget_class("QToolButton")(parent=self))

    def placeButton(self):
        return self._place

    def deleteButton(self):
        return self._delete

    def setCurrentNode(self, node) -> None:
        self._dynamic["__node"] = node

    def currentNode(self):
        return self._dynamic.get("__node")

    def changed(self, name, value) -> None:
        if name == "buttonsVisible":
            for button in (self._place, self._delete):
                button.visible = bool(value)


class QPlainTextEdit(QWidget):
    qt_class = "QPlainTextEdit"
    defaults = {"plainText": ""}

    def appendPlainText(self, text: str) -> None:
        self.plainText = f"{self.plainText}\n{text}" if self.plainText else text

    def clear(self) -> None:
        self.plainText = ""

    def toPlainText(self) -> str:
        return self.plainText

    def setPlainText(self, text: str) -> None:
        self.plainText = text


class TextWidget(QWidget):
    """QLineEdit, QLabel: `text`, with textChanged where the class has it."""

    defaults = {"text": ""}

    def changed(self, name, value) -> None:
        if name == "text" and "textChanged" in API.members(self.qt_class)[1]:
            self.textChanged.emit(value)


class ctkPathLineEdit(QWidget):
    qt_class = "ctkPathLineEdit"
    defaults = {"currentPath": ""}

    def changed(self, name, value) -> None:
        if name == "currentPath":
            self.currentPathChanged.emit(value)


class QTableWidget(QWidget):
    """Rows of items; `rowCount` grows or cuts the table."""

    qt_class = "QTableWidget"
    defaults = {"rowCount": 0, "columnCount": 0}

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_items", {})
        super().__init__(*args, **kwargs)

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.columnCount = max(self.columnCount, len(labels))

    def setItem(self, row: int, column: int, item) -> None:
        self._items[row, column] = item

    def item(self, row: int, column: int):
        return self._items.get((row, column))

    def changed(self, name, value) -> None:
        if name == "rowCount":
            for key in [k for k in self._items if k[0] >= value]:
                del self._items[key]


class QTableWidgetItem:
    def __init__(self, text: str = ""):
        self._text, self._data = text, {}

    def text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = text

    def setData(self, role, value) -> None:
        self._data[role] = value

    def data(self, role):
        return self._data.get(role)


class QTextBrowser(QWidget):
    qt_class = "QTextBrowser"
    defaults = {"html": ""}

    def setHtml(self, html: str) -> None:
        self.html = html


class QFileDialog(QWidget):
    """`getSaveFileName` answers what a test put in `QFileDialog.answer` (a user's choice)."""

    qt_class = "QFileDialog"
    answer = ""

    @staticmethod
    def getSaveFileName(*args) -> str:
        return QFileDialog.answer


class QTimer(StandInObject):
    """Ticks only when a test calls `tick()`."""

    qt_class = "QTimer"
    defaults = {"active": False, "interval": 0}

    def setInterval(self, msec: int) -> None:
        self.interval = msec

    def start(self, *args) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return bool(self.active)

    def tick(self) -> None:
        self.timeout.emit()


BEHAVIOUR = {"QPushButton": AbstractButton, "QCheckBox": AbstractButton, "QToolButton": AbstractButton,
             "ctkCollapsibleButton": AbstractButton, "QSpinBox": ValueWidget, "QDoubleSpinBox": ValueWidget,
             "ctkSliderWidget": ValueWidget, "QProgressBar": ValueWidget, "QComboBox": QComboBox,
             "qMRMLNodeComboBox": qMRMLNodeComboBox, "qSlicerMarkupsPlaceWidget": qSlicerMarkupsPlaceWidget,
             "QPlainTextEdit": QPlainTextEdit, "QLineEdit": TextWidget, "QLabel": TextWidget,
             "ctkPathLineEdit": ctkPathLineEdit, "QTimer": QTimer, "QTableWidget": QTableWidget,
             "QTextBrowser": QTextBrowser, "QWidget": QWidget, "QObject": StandInObject}
_CLASSES: dict[str, type] = {}


def widget_class(name: str) -> type:
    """The stand-in class of a Qt/CTK/Slicer class named in the widget API (one class object per name, so
    Slicer's `type(widget) == qt.QComboBox` tests work)."""
    if name not in _CLASSES:
        if name not in API.classes:
            raise AttributeError(f"{name} is not in Slicer 5.12.3's widget API")
        base = BEHAVIOUR.get(name)
        if base is None:
            widget = API.classes[name].get("qt_root", "QWidget") == "QWidget" or name.startswith(("QAbstract", "QFrame"))
            base = QWidget if widget else StandInObject
        _CLASSES[name] = type(name, (base,), {"qt_class": name})
    return _CLASSES[name]


# ---- the .ui loader -------------------------------------------------------------------------------------------

def _ui_value(element: ET.Element):
    kind = element.tag
    text = element.text or ""
    if kind == "bool":
        return text == "true"
    if kind == "number":
        return int(text)
    if kind == "double":
        return float(text)
    if kind == "stringlist":
        return [s.text or "" for s in element.findall("string")]
    if kind in ("string", "cstring", "enum", "set"):
        return text
    return None  # sizes, rects, fonts: not modelled


class QUiLoader:
    """Builds stand-in widgets from a .ui file, as QUiLoader builds real ones."""

    def load(self, qfile) -> QWidget:
        root = ET.parse(qfile.path).getroot()
        top = root.find("widget")
        names: dict[str, StandInObject] = {}
        widget = self._widget(top, None, names)
        for connection in root.iter("connection"):
            sender, receiver = names[connection.findtext("sender")], names[connection.findtext("receiver")]
            slot = SIGNATURE.match(connection.findtext("slot")).group(1)
            sender.connect(connection.findtext("signal"), getattr(receiver, slot))
        return widget

    def _widget(self, element: ET.Element, parent, names: dict) -> StandInObject:
        widget = widget_class(element.get("class"))(parent=parent)
        widget.name = element.get("name", "")
        names[widget.name] = widget
        for prop in element.findall("property"):
            value = _ui_value(prop[0])
            if prop.get("stdset") == "0":
                widget.setProperty(prop.get("name"), value)
            elif value is not None:
                setattr(widget, prop.get("name"), value)
        for item in element.findall("item"):
            widget.addItem(item.find("property")[0].text or "")
        self._children(element, widget, names)
        return widget

    def _children(self, element: ET.Element, widget, names: dict) -> None:
        for child in element:
            if child.tag == "widget":
                self._widget(child, widget, names)
            elif child.tag in ("layout", "item"):
                self._children(child, widget, names)


class EnumNamespace(type):
    """`qt.Qt.WaitCursor`, `qt.QMessageBox.Ok | qt.QMessageBox.Cancel`: distinct flag values."""

    def __getattr__(cls, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        return 1 << (sum(map(ord, name)) % 60)


class QFile(metaclass=EnumNamespace):
    def __init__(self, path):
        self.path = str(path)

    def exists(self) -> bool:
        return Path(self.path).is_file()

    def open(self, *mode) -> bool:
        return self.exists()


class QSettings:
    """Empty settings: no developer mode, no remembered values."""

    def value(self, key, default=None):
        return default

    def contains(self, key) -> bool:
        return False

    def setValue(self, key, value) -> None:
        pass


class Value:
    """QIcon, QColor: values the module only passes along."""

    def __init__(self, *args):
        self.args = args


def _module(name: str, classes: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(classes)

    def lookup(attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return widget_class(attribute)

    module.__getattr__ = lookup
    return module


def qt_module() -> types.ModuleType:
    return _module("qt", {"QUiLoader": QUiLoader, "QTableWidgetItem": QTableWidgetItem, "QFileDialog": QFileDialog,
                          "QFile": QFile, "QSettings": QSettings,
                          "QIcon": Value, "QColor": Value,
                          "QVBoxLayout": Layout, "QHBoxLayout": Layout, "QFormLayout": Layout, "QGridLayout": Layout,
                          "Qt": EnumNamespace("Qt", (), {}), "QMessageBox": EnumNamespace("QMessageBox", (), {}),
                          "QSizePolicy": EnumNamespace("QSizePolicy", (), {})})


# ---- slicer.app and slicer.modules ----------------------------------------------------------------------------

class Application:
    """`slicer.app`, as far as the framework and the module ask: versions, testing mode, connections."""

    applicationName = "3D Slicer"

    def __init__(self, version: str):
        self.majorVersion, self.minorVersion = (int(x) for x in version.lstrip("v").split(".")[:2])
        self.connections: dict[str, list] = {}
        self.module_manager = StandInObject()

    def testingEnabled(self) -> bool:
        return True

    def translate(self, context: str, text: str) -> str:
        return text

    def connect(self, signature: str, slot) -> None:
        self.connections.setdefault(signature, []).append(slot)

    def moduleManager(self):
        return self

    def disconnect(self, signature: str, slot) -> None:
        self.connections.get(signature, []).remove(slot)

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def processEvents(self) -> None:
        pass

    def startupEnvironment(self):
        """Slicer's environment before its launcher changed it (a QProcessEnvironment): here, this one."""
        import os

        return types.SimpleNamespace(keys=lambda: list(os.environ), value=os.environ.get)


# ---- putting it together --------------------------------------------------------------------------------------

@contextlib.contextmanager
def slicer_framework(version: str, module_dir: Path = REPO / "BrainDINO",
                     app_version: str | None = None) -> Iterator[types.ModuleType]:
    """Slicer `version`'s framework over the wheel's `slicer` package, the stand-ins above, and the module
    file of `module_dir` imported through them; yields the module. Everything is put back afterwards.

    `app_version` makes `slicer.app` report another Slicer (e.g. "5.8") than the framework's."""
    framework = SLICER_PYTHON / version / "slicer"
    module_name = module_dir.name
    saved_modules = {name: sys.modules.get(name) for name in
                     ("qt", "ctk", module_name, *(f"slicer.{m}" for m in FRAMEWORK_MODULES))}
    saved_modules.update({name: module for name, module in sys.modules.items()
                          if name.startswith("slicer.parameterNodeWrapper.")})
    saved_path = list(slicer.__path__)
    saved_attributes = {name: getattr(slicer, name) for name in (*FRAMEWORK_MODULES, "app", "modules", "selfTests")
                        if hasattr(slicer, name)}
    added = []
    try:
        for name in list(sys.modules):
            if name == module_name or any(name == f"slicer.{m}" or name.startswith(f"slicer.{m}.")
                                          for m in FRAMEWORK_MODULES):
                del sys.modules[name]
        sys.modules["qt"] = qt_module()
        sys.modules["ctk"] = _module("ctk", {})
        slicer.__path__[:] = [str(framework), *saved_path]
        slicer.app = Application(app_version or version)
        slicer.modules = types.SimpleNamespace(**{module_name.lower(): types.SimpleNamespace(
            path=str(module_dir / f"{module_name}.py"))})
        for name in ("qMRMLWidget", "qSlicerWidget", "qMRMLNodeComboBox", "qSlicerMarkupsPlaceWidget",
                     "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLScreenShotDialog",
                     "qSlicerScriptedLoadableModuleWidget"):
            if not hasattr(slicer, name):
                setattr(slicer, name, widget_class(name))
                added.append(name)
        for name in FRAMEWORK_MODULES:
            setattr(slicer, name, importlib.import_module(f"slicer.{name}"))
        sys.path.insert(0, str(module_dir))
        try:
            yield importlib.import_module(module_name)
        finally:
            sys.path.remove(str(module_dir))
    finally:
        for name in list(sys.modules):
            if name == module_name or any(name == f"slicer.{m}" or name.startswith(f"slicer.{m}.")
                                          for m in FRAMEWORK_MODULES):
                del sys.modules[name]
        sys.modules.update({k: v for k, v in saved_modules.items() if v is not None})
        for name in ("qt", "ctk"):
            if saved_modules.get(name) is None:
                sys.modules.pop(name, None)
        slicer.__path__[:] = saved_path
        for name in added:
            delattr(slicer, name)
        for name in (*FRAMEWORK_MODULES, "app", "modules", "selfTests"):
            if name in saved_attributes:
                setattr(slicer, name, saved_attributes[name])
            elif hasattr(slicer, name):
                delattr(slicer, name)


@contextlib.contextmanager
def module_widget(module: types.ModuleType, name: str = "BrainDINO") -> Iterator:
    """The module's widget the way Slicer makes it (a qSlicerScriptedLoadableModuleWidget parent with a vertical
    layout, then `setup()`); `cleanup()` afterwards, as when Slicer unloads the module."""
    parent = slicer.qSlicerScriptedLoadableModuleWidget()
    parent.setLayout(Layout())
    parent.isEntered = False
    widget = getattr(module, f"{name}Widget")(parent)
    widget.setup()
    try:
        yield widget
    finally:
        widget.cleanup()
