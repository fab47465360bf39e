"""The Slicer extension without Slicer: CMake lists, the .ui bindings, and what the module file imports.

* CMake is really configured (``cmake`` with a stand-in ``SlicerConfig.cmake``
  whose macros write down what they were given): every ``.py`` of the module and
  every resource must be in ``MODULE_PYTHON_SCRIPTS`` / ``MODULE_PYTHON_RESOURCES``,
  the self-test registered, the extension metadata filled in.
* The ``.ui`` parses, and every ``SlicerParameterName`` names a field of the
  ``@parameterNodeWrapper`` class (read with ``ast``) with a widget that can show it.
* ``PedicleScrewPose.py`` imports at module level only what Slicer bundles, and
  stays Python 3.9 syntax; the core never imports slicer/qt/ctk, except ``mrml.py``,
  which uses no Qt and no application singletons.
"""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "PedicleScrewPose"
MODULE_FILE = MODULE_DIR / "PedicleScrewPose.py"
LIB_DIR = MODULE_DIR / "PedicleScrewPoseLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "PedicleScrewPose.ui"

# What a Slicer installation gives a scripted module at import time (Slicer 5.6+).
BUNDLED = {"__future__", "logging", "os", "sys", "pathlib", "typing", "json", "math", "re", "enum", "dataclasses",
           "importlib", "unittest", "tempfile", "qt", "ctk", "vtk", "slicer", "numpy", "SimpleITK"}
NOT_AT_IMPORT = {"torch", "monai", "scipy", "PedicleScrewPoseLib", "diffdrr", "tqdm", "PIL", "matplotlib"}

_STUB_USE_SLICER = """
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  file(APPEND "${CHECK_OUT}" "NAME=${M_NAME}\\nSCRIPTS=${M_SCRIPTS}\\nRESOURCES=${M_RESOURCES}\\n")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(T "" "SCRIPT" "" ${ARGN})
  file(APPEND "${CHECK_OUT}" "UNITTEST=${T_SCRIPT}\\n")
endfunction()
"""
_STUB_CONFIG = """
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/CPack.cmake")
"""
_STUB_GENERATE = """
foreach(v HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  file(APPEND "${CHECK_OUT}" "EXTENSION_${v}=${EXTENSION_${v}}\\n")
endforeach()
"""


# ----------------------------------------------------------------------------- CMake
def _configure(tmp_path) -> dict:
    """What the module's CMake hands to Slicer's macros, by configuring the real files."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(_STUB_CONFIG)
    (stub / "UseSlicer.cmake").write_text(_STUB_USE_SLICER)
    (stub / "GenerateConfig.cmake").write_text(_STUB_GENERATE)
    (stub / "CPack.cmake").write_text("")
    out = tmp_path / "cmake_out.txt"
    if shutil.which("cmake"):
        proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DSlicer_DIR={stub}",
                               "-DBUILD_TESTING=ON", f"-DCHECK_OUT={out}"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        text = out.read_text(encoding="utf-8")
    else:  # no cmake on this machine: read the same lists with a small interpreter of what the files use
        text = _evaluate_cmake_by_hand()
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def _evaluate_cmake_by_hand() -> str:
    src = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    src = re.sub(r"#[^\n]*", "", src)
    variables = {"CMAKE_CURRENT_SOURCE_DIR": str(MODULE_DIR)}

    def expand(s):
        for _ in range(5):
            s = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), ""), s)
        return s

    for cmd, args in re.findall(r"(\w+)\s*\(([^)]*)\)", src):
        words = [expand(w) for w in args.split()]
        if cmd == "set":
            variables[words[0]] = ";".join(w for w in words[1:] if w)
        elif cmd == "file" and words[0] == "GLOB":
            var, rest = words[1], words[2:]
            rel = None
            files = []
            i = 0
            while i < len(rest):
                if rest[i] == "RELATIVE":
                    rel = Path(rest[i + 1])
                    i += 2
                    continue
                if rest[i] == "LIST_DIRECTORIES":
                    i += 2
                    continue
                if rest[i] == "CONFIGURE_DEPENDS":
                    i += 1
                    continue
                files += [p for p in sorted(MODULE_DIR.glob(rest[i])) if p.is_file()]
                i += 1
            variables[var] = ";".join(str(p.relative_to(rel)) if rel else str(p) for p in files)
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    meta = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', top))
    lines = [f"NAME={variables.get('MODULE_NAME', '')}", f"SCRIPTS={variables.get('MODULE_PYTHON_SCRIPTS', '')}",
             f"RESOURCES={variables.get('MODULE_PYTHON_RESOURCES', '')}"]
    if "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in src:
        lines.append(f"UNITTEST={variables.get('MODULE_NAME', '')}.py")
    lines += [f"{k}={v}" for k, v in meta.items()]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cmake_lists(tmp_path_factory):
    return _configure(tmp_path_factory.mktemp("cmake"))


def _module_files(pattern_root: Path, suffix=None) -> set:
    out = set()
    for p in pattern_root.rglob("*"):
        if not p.is_file() or "__pycache__" in p.parts or p.name.startswith("."):
            continue
        if suffix and p.suffix != suffix:
            continue
        out.add(p.relative_to(MODULE_DIR).as_posix())
    return out


def test_cmake_lists_every_module_script(cmake_lists):
    assert cmake_lists["NAME"] == "PedicleScrewPose"
    listed = set(filter(None, cmake_lists["SCRIPTS"].split(";")))
    on_disk = {"PedicleScrewPose.py"} | _module_files(LIB_DIR, ".py")
    assert on_disk - listed == set(), "module .py files missing from MODULE_PYTHON_SCRIPTS"
    assert listed - on_disk == set(), "MODULE_PYTHON_SCRIPTS lists files that do not exist"
    assert "PedicleScrewPoseLib/mrml.py" in listed and "PedicleScrewPoseLib/__init__.py" in listed
    # Every .py directly in the module folder is loaded by Slicer as a module: only the module file may be there.
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["PedicleScrewPose.py"]


def test_cmake_lists_every_resource_and_registers_the_self_test(cmake_lists):
    listed = set(filter(None, cmake_lists["RESOURCES"].split(";")))
    on_disk = _module_files(MODULE_DIR / "Resources")
    assert {"Resources/Icons/PedicleScrewPose.png", "Resources/UI/PedicleScrewPose.ui"} <= on_disk
    assert on_disk - listed == set(), "resources missing from MODULE_PYTHON_RESOURCES"
    assert listed - on_disk == set(), "MODULE_PYTHON_RESOURCES lists files that do not exist"
    assert cmake_lists["UNITTEST"] == "PedicleScrewPose.py"


def test_extension_metadata_is_filled_in(cmake_lists):
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert cmake_lists.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} is empty"
    assert cmake_lists["EXTENSION_HOMEPAGE"].startswith("https://")
    assert cmake_lists["EXTENSION_ICONURL"].endswith(".png")
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"find_package\(Slicer REQUIRED\)", top) and "add_subdirectory(PedicleScrewPose)" in top


# ----------------------------------------------------------------------------- .ui and parameter node
def _module_tree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _parameter_fields() -> dict:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    classes = [n for n in _module_tree().body if isinstance(n, ast.ClassDef)
               and any(ast.unparse(d).endswith("parameterNodeWrapper") for d in n.decorator_list)]
    assert len(classes) == 1, "expected one @parameterNodeWrapper class"
    return {n.target.id: ast.unparse(n.annotation) for n in classes[0].body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for w in root.iter("widget"):
        props = {}
        for p in w.findall("property"):
            value = p.find("string")
            if value is not None:
                props[p.get("name")] = value.text
            strings = [s.text for s in p.findall("stringlist/string")]
            if strings:
                props[p.get("name")] = strings
        widgets[w.get("name")] = (w.get("class"), props)
    return widgets


# Which widget classes can show which annotations (parameterNodeWrapper's GUI connectors).
def _widget_fits(widget_class: str, annotation: str) -> bool:
    if widget_class == "qMRMLNodeComboBox":
        return "vtkMRML" in annotation and not annotation.startswith("list[")
    if widget_class == "QComboBox":
        return "Choice(" in annotation
    if widget_class == "QCheckBox":
        return annotation == "bool"
    if widget_class == "ctkPathLineEdit":
        return annotation in ("pathlib.Path", "Path")
    if widget_class in ("QSpinBox", "QSlider"):
        return "int" in annotation
    if widget_class in ("QDoubleSpinBox", "ctkSliderWidget"):
        return "float" in annotation
    if widget_class == "QLineEdit":
        return annotation == "str"
    return False


def test_ui_parses_and_every_parameter_name_is_a_field_its_widget_can_show():
    fields = _parameter_fields()
    widgets = _ui_widgets()
    bound = {name: (cls, props) for name, (cls, props) in widgets.items() if "SlicerParameterName" in props}
    assert len(bound) >= 5
    for name, (cls, props) in bound.items():
        param = props["SlicerParameterName"]
        assert param in fields, f"widget {name}: SlicerParameterName {param!r} is not a parameter node field"
        assert _widget_fits(cls, fields[param]), f"widget {name} ({cls}) cannot show {param}: {fields[param]}"
        if cls == "qMRMLNodeComboBox":
            types = set(re.findall(r"vtkMRML\w+", fields[param]))
            assert set(props.get("nodeTypes", [])) == types, f"widget {name}: nodeTypes differ from {types}"
    assert len({props["SlicerParameterName"] for _, props in bound.values()}) == len(bound)


def test_every_ui_widget_the_module_uses_exists():
    used = set()
    for node in ast.walk(_module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.add(node.attr)
    widgets = _ui_widgets()
    assert used, "the module uses no widgets?"
    assert used - set(widgets) == set(), "the module uses widgets the .ui does not have"
    for name in ("applyButton", "xrayVolumesComboBox", "resultsTableView", "progressBar", "loadCaseButton"):
        assert name in widgets


# ----------------------------------------------------------------------------- imports and syntax
def _module_level_imports(tree) -> set:
    """Top-level module names imported when the file is imported (also inside top-level try/if)."""
    names = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add((node.module or "").split(".")[0] if node.level == 0 else ".")
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.If, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return names


def test_module_file_imports_only_what_slicer_bundles():
    names = _module_level_imports(_module_tree())
    assert names <= BUNDLED, f"imported at module level but not bundled with Slicer: {sorted(names - BUNDLED)}"
    assert not names & NOT_AT_IMPORT
    # The heavy packages are imported inside methods (installed on first use after asking).
    assert "PedicleScrewPoseLib" in MODULE_FILE.read_text(encoding="utf-8")


def test_module_file_is_python39_and_uses_real_annotations():
    src = MODULE_FILE.read_text(encoding="utf-8")
    ast.parse(src, feature_version=(3, 9))
    tree = _module_tree()
    # parameterNodeWrapper reads the annotations as types: no postponed (string) annotations,
    # and no `X | Y` unions, which Python 3.9 cannot evaluate.
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body)
    for node in ast.walk(tree):
        ann = getattr(node, "annotation", None) or getattr(node, "returns", None)
        if ann is not None:
            assert not any(isinstance(b, ast.BinOp) and isinstance(b.op, ast.BitOr) for b in ast.walk(ann)), \
                f"line {node.lineno}: use typing.Union/Optional for Python 3.9"


def test_module_classes_follow_the_scripted_module_pattern():
    tree = _module_tree()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in c.bases] for name, c in classes.items()}
    assert "ScriptedLoadableModule" in bases["PedicleScrewPose"]
    assert "ScriptedLoadableModuleWidget" in bases["PedicleScrewPoseWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["PedicleScrewPoseLogic"]
    assert "ScriptedLoadableModuleTest" in bases["PedicleScrewPoseTest"]
    test_methods = {f.name: f for f in classes["PedicleScrewPoseTest"].body if isinstance(f, ast.FunctionDef)}
    assert "slicer.mrmlScene.Clear" in ast.unparse(test_methods["setUp"])
    assert "runTest" in test_methods and sum(n.startswith("test_") for n in test_methods) >= 2
    src = MODULE_FILE.read_text(encoding="utf-8")
    assert "tryWithErrorDisplay" in src and "waitCursor=True" in src
    assert "Uneri" in src and "Phys Med Biol" in src  # the method is cited in the help
    # The Widget asks before installing; the Logic never shows dialogs.
    logic_src = ast.unparse(classes["PedicleScrewPoseLogic"])
    assert "Display(" not in logic_src and "confirmOkCancelDisplay" in ast.unparse(classes["PedicleScrewPoseWidget"])


def test_icon_is_a_small_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "PedicleScrewPose.png") as im:
        assert im.format == "PNG" and im.size == (128, 128)


def test_core_never_imports_qt_and_mrml_uses_no_application_singletons():
    for path in sorted(LIB_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add((node.module or "").split(".")[0])
        assert not imported & {"qt", "ctk"}, f"{path.name} imports Qt"
        if path.name != "mrml.py":
            assert "slicer" not in imported, f"{path.name} imports slicer (only mrml.py may)"
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in ("mrmlScene", "app", "util", "modules"), \
                    f"mrml.py line {node.lineno}: slicer.{node.attr} (the scene must be passed in)"


def test_module_and_mrml_agree_on_the_projection_matrix_attribute():
    from PedicleScrewPoseLib import mrml

    consts = {t.id: n.value.value for n in _module_tree().body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert consts["PROJECTION_MATRIX_ATTRIBUTE"] == mrml.ATTR_PROJECTION_MATRIX
