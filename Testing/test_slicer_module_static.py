"""What can be checked about the Slicer module and its packaging without Slicer.

The module itself runs only inside 3D Slicer (its self-test, SAMMed3DTest, runs there). Here: every
shipped Python file compiles for Python 3.9+ and is ASCII, the panel's .ui has every widget the code
uses, the CMake build lists exactly the files that exist, the extension metadata agrees across
CMakeLists.txt, SAMMed3D.s4ext and SAMMed3D.json, and the icon is a 128x128 PNG.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SAMMed3D" / "SAMMed3D.py"
UI = ROOT / "Resources" / "UI" / "SAMMed3D.ui"
ICON = ROOT / "Resources" / "Icons" / "SAMMed3D.png"
ROOT_CMAKE = ROOT / "CMakeLists.txt"
MODULE_CMAKE = ROOT / "SAMMed3D" / "CMakeLists.txt"
TESTING_CMAKE = ROOT / "Testing" / "Python" / "CMakeLists.txt"
S4EXT = ROOT / "SAMMed3D.s4ext"
CATALOG_ENTRY = ROOT / "SAMMed3D.json"

ENGINE_FILES = sorted(p for p in (ROOT / "SAMMed3DLib").rglob("*.py") if "__pycache__" not in p.parts)
SHIPPED_PYTHON = [MODULE, *ENGINE_FILES]
SLICER_READS = [MODULE, UI, ROOT_CMAKE, MODULE_CMAKE, TESTING_CMAKE, S4EXT, CATALOG_ENTRY]

# Keys allowed by Slicer's slicer-extension-catalog-entry-schema-v1.0.2.json (additionalProperties: false).
CATALOG_KEYS = {
    "$schema",
    "category",
    "scm_url",
    "scm_revision",
    "scm_type",
    "build_dependencies",
    "dicom_support_rule",
    "build_subdirectory",
    "enabled",
    "tier",
}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# Python files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED_PYTHON, ids=relative)
def test_shipped_python_compiles_for_python_3_9(path):
    source = path.read_text(encoding="utf-8")
    compile(source, str(path), "exec", dont_inherit=True)
    ast.parse(source, str(path), feature_version=(3, 9))


@pytest.mark.parametrize("path", SHIPPED_PYTHON + SLICER_READS[1:], ids=relative)
def test_files_slicer_loads_are_ascii(path):
    data = path.read_bytes()
    bad = [(n + 1, line) for n, line in enumerate(data.splitlines()) if any(byte > 127 for byte in line)]
    assert not bad, f"non-ASCII characters (they have stopped Slicer from loading modules) on lines {bad[:3]}"


def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def test_module_defines_the_classes_slicer_looks_for():
    classes = {node.name for node in module_tree().body if isinstance(node, ast.ClassDef)}
    assert {"SAMMed3D", "SAMMed3DWidget", "SAMMed3DLogic", "SAMMed3DTest", "SAMMed3DParameterNode"} <= classes


def test_the_self_test_runs_every_test_it_defines():
    """Slicer calls `runTest` only: a test method it does not list would never run."""
    test_class = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "SAMMed3DTest")
    methods = {n.name: n for n in test_class.body if isinstance(n, ast.FunctionDef)}
    defined = {name for name in methods if name.startswith("test_")}
    listed = {
        n.attr
        for n in ast.walk(methods["runTest"])
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }
    assert defined and defined <= listed, f"not run by runTest: {sorted(defined - listed)}"


def test_module_imports_neither_torch_nor_the_engine_at_load_time():
    """The module must load (and offer to install PyTorch) before PyTorch exists."""
    top_level = set()
    for node in module_tree().body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"torch", "SAMMed3DLib", "SimpleITK", "PyTorchUtils"}


def test_the_torch_version_the_module_installs_is_the_one_the_engine_needs():
    from SAMMed3DLib.torch_version import MINIMUM_TORCH_VERSION

    constants = {
        target.id: node.value.value
        for node in module_tree().body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert constants["MINIMUM_TORCH_VERSION"] == ".".join(str(part) for part in MINIMUM_TORCH_VERSION)


def test_the_module_folder_holds_no_other_python_file():
    """Slicer loads every .py in a module folder as a module."""
    assert sorted(p.name for p in MODULE.parent.glob("*.py")) == ["SAMMed3D.py"]


# The panel ------------------------------------------------------------------------------------

QT_WIDGETS = {
    "QWidget",
    "QLabel",
    "QPushButton",
    "QCheckBox",
    "QComboBox",
    "QLineEdit",
    "QSpinBox",
    "QDoubleSpinBox",
    "QGroupBox",
    "QFrame",
    "QToolButton",
    "QRadioButton",
}


def ui_widgets() -> dict[str, str]:
    """objectName -> class of every widget in the .ui."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}


def ui_parameter_bindings() -> list[tuple[str, str]]:
    """(SlicerParameterName, widget class) of every bound widget."""
    return [
        (prop.findtext("string"), widget.get("class"))
        for widget in ET.parse(UI).getroot().iter("widget")
        for prop in widget.findall("property")
        if prop.get("name") == "SlicerParameterName"
    ]


def test_every_ui_widget_the_code_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    assert used, "the module should use its .ui"
    missing = used - set(ui_widgets())
    assert not missing, f"used in SAMMed3D.py but not in {relative(UI)}: {sorted(missing)}"


def test_ui_top_widget_is_a_mrml_widget_and_custom_widgets_are_declared():
    root = ET.parse(UI).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    for name, widget_class in ui_widgets().items():
        assert widget_class in QT_WIDGETS | declared, f"{name}: {widget_class} is neither Qt nor declared"


def parameter_node_fields() -> dict[str, str]:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "SAMMed3DParameterNode":
            fields = [item for item in node.body if isinstance(item, ast.AnnAssign)]
            return {item.target.id: ast.unparse(item.annotation) for item in fields}
    raise AssertionError("SAMMed3DParameterNode not found")


def test_every_ui_parameter_binding_names_a_parameter_of_a_matching_type():
    fields = parameter_node_fields()
    enums = {
        node.name
        for node in module_tree().body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "enum.Enum" for b in node.bases)
    }
    bindings = ui_parameter_bindings()
    assert bindings
    names = [parameter for parameter, _ in bindings]
    assert len(names) == len(set(names)), f"a parameter is bound to two widgets: {names}"
    for parameter, widget_class in bindings:
        assert parameter in fields, f"the .ui binds '{parameter}', which the parameter node does not have"
        kind = fields[parameter]
        expected = {
            "qMRMLNodeComboBox": kind.startswith("vtkMRML"),
            "QCheckBox": kind == "bool",
            "QComboBox": kind in enums,
            "ctkPathLineEdit": kind == "pathlib.Path",
        }.get(widget_class)
        assert expected, f"{parameter}: a {widget_class} cannot show a {kind}"


def test_resources_the_module_asks_for_exist():
    requested = re.findall(r'resourcePath\("([^"]+)"\)', MODULE.read_text(encoding="utf-8"))
    assert "UI/SAMMed3D.ui" in requested and "Icons/SAMMed3D.png" in requested
    for name in requested:
        assert (ROOT / "Resources" / name).is_file(), name


# CMake ----------------------------------------------------------------------------------------


def cmake_list(path: Path, variable: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set in {relative(path)}"
    return match.group(1).replace("${MODULE_NAME}", "SAMMed3D").split()


def cmake_values(path: Path) -> dict[str, str]:
    return dict(re.findall(r'^set\((EXTENSION_\w+)\s+"([^"]*)"\)', path.read_text(encoding="utf-8"), re.M))


def test_every_file_the_build_lists_exists():
    listed = [ROOT / f for f in cmake_list(ROOT_CMAKE, "ENGINE_PYTHON_SCRIPTS")]
    listed += [ROOT / f for f in cmake_list(ROOT_CMAKE, "ENGINE_PYTHON_RESOURCES")]
    listed += [MODULE.parent / f for f in cmake_list(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS")]
    missing = [relative(p) for p in listed if not p.is_file()]
    assert not missing, f"listed in CMake but absent: {missing}"


def test_every_engine_file_is_listed_once_for_the_build():
    scripts = cmake_list(ROOT_CMAKE, "ENGINE_PYTHON_SCRIPTS")
    assert len(scripts) == len(set(scripts)), "a script is listed twice"
    unlisted = sorted({relative(p) for p in ENGINE_FILES} - set(scripts))
    assert not unlisted, f"add to ENGINE_PYTHON_SCRIPTS in CMakeLists.txt, or Slicer will not have them: {unlisted}"


def test_the_build_ships_the_panel_the_icon_and_the_demo_weights_where_the_code_looks():
    resources = cmake_list(ROOT_CMAKE, "ENGINE_PYTHON_RESOURCES")
    assert {"Resources/UI/SAMMed3D.ui", "Resources/Icons/SAMMed3D.png"} <= set(resources)
    from SAMMed3DLib.published import DEMO_CHECKPOINT

    assert relative(DEMO_CHECKPOINT) in resources


def test_module_build_keeps_generic_tests_and_the_self_test_is_registered():
    assert "WITH_GENERIC_TESTS" in MODULE_CMAKE.read_text(encoding="utf-8")
    registered = re.findall(
        r"slicer_add_python_unittest\(SCRIPT\s+\$\{CMAKE_SOURCE_DIR\}/(\S+)\)",
        TESTING_CMAKE.read_text(encoding="utf-8"),
    )
    assert registered == [relative(MODULE)]
    assert "add_subdirectory(Testing)" in ROOT_CMAKE.read_text(encoding="utf-8")
    assert "add_subdirectory(Python)" in (ROOT / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")


# Extension metadata ---------------------------------------------------------------------------


def s4ext_values() -> dict[str, str]:
    values = {}
    for line in S4EXT.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            values[key] = value.strip()
    return values


def test_s4ext_repeats_the_cmake_metadata():
    cmake, s4ext = cmake_values(ROOT_CMAKE), s4ext_values()
    shared = ("homepage", "category", "contributors", "description", "iconurl", "screenshoturls", "status", "depends")
    for key in shared:
        assert s4ext[key] == cmake["EXTENSION_" + key.upper()], key
    assert s4ext["scm"] == "git"
    assert s4ext["scmurl"].removesuffix(".git") == cmake["EXTENSION_HOMEPAGE"]


def test_catalog_entry_follows_the_schema_and_agrees_with_cmake():
    entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_KEYS
    cmake = cmake_values(ROOT_CMAKE)
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"] == s4ext_values()["scmurl"]
    assert entry["scm_revision"] == s4ext_values()["scmrevision"]


def test_metadata_is_sensible():
    cmake = cmake_values(ROOT_CMAKE)
    assert cmake["EXTENSION_DEPENDS"] == "PyTorch"
    assert cmake["EXTENSION_CATEGORY"] == "Segmentation"
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in MODULE.read_text(encoding="utf-8")
    assert 20 < len(cmake["EXTENSION_DESCRIPTION"]) < 300 and "\n" not in cmake["EXTENSION_DESCRIPTION"]
    assert cmake["EXTENSION_ICONURL"].endswith("/" + relative(ICON))
    for url in [cmake["EXTENSION_HOMEPAGE"], cmake["EXTENSION_ICONURL"], *cmake["EXTENSION_SCREENSHOTURLS"].split()]:
        assert url.startswith("https://") and cmake["EXTENSION_HOMEPAGE"].split("github.com/")[1] in url


def test_icon_and_screenshot_urls_name_png_files_of_this_repository():
    cmake = cmake_values(ROOT_CMAKE)
    image_urls = [cmake["EXTENSION_ICONURL"], *cmake["EXTENSION_SCREENSHOTURLS"].split()]
    assert len(image_urls) >= 2
    for url in image_urls:
        # raw.githubusercontent.com/<owner>/<repo>/<branch>/<path in the repository>
        path = ROOT / url.split("raw.githubusercontent.com/")[1].split("/", 3)[3]
        assert path.is_file(), f"{url} names {relative(path)}, which is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url


def test_license_is_mit_for_the_contributors():
    text = (ROOT / "LICENSE.txt").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "SAMMed3D contributors" in text


# Icon -----------------------------------------------------------------------------------------


def test_icon_is_a_128_pixel_square_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)
