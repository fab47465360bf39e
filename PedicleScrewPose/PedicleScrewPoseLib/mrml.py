"""MRML logic: a case and a result in a Slicer scene, and back.

Everything here takes the ``vtkMRMLScene`` it works on as an argument and uses
only Slicer's MRML classes (never Qt, ``slicer.mrmlScene``, ``slicer.app`` or
``slicer.util``), so the same code runs inside the 3D Slicer application and on
the ``slicer-core`` wheel (``pip install slicer-core==5.11.0.6``), where the
tests run it on a real scene.

What goes into a scene (world frame RAS, millimetres):

* an **X-ray** is a ``vtkMRMLScalarVolumeNode`` holding the image (``[v, u]``,
  one slice) and, as node attributes, its projection matrix
  (``PedicleScrewPose.ProjectionMatrix``: the 12 numbers of ``P`` row by row,
  ``[u w, v w, w] = P [R, A, S, 1]``), ``PedicleScrewPose.Width``/``Height``
  (pixels), ``PedicleScrewPose.Metal`` (``bright``/``dark``, when known) and
  ``PedicleScrewPose.ViewName``.  Its IJK-to-RAS matrix puts the image where
  the detector is: pixel ``(u, v)`` (= voxel ``(i, j, 0)``) lies on the ray
  through that pixel, at the source-to-detector distance (from the view's
  ``sdd_mm`` or ``pixel_mm`` when the case gives it, else
  :data:`DEFAULT_DETECTOR_DISTANCE_MM`).  Whatever that distance, every pixel is
  on its own ray, so the image plane and the source show the projection
  exactly; the attribute, not the volume geometry, is what the pipeline reads.
* a **run** (one result) is one subject-hierarchy folder, and a second run makes
  a second folder: per screw a sub-folder with a ``vtkMRMLLinearTransformNode``
  (``T_world_from_screw``, set with ``SetMatrixTransformToParent``), a
  ``vtkMRMLModelNode`` (the screw mesh of that diameter and length, in the
  screw frame) and a ``vtkMRMLMarkupsLineNode`` (entry → tip), both observing
  the transform, named by level and side when known ("T12 left") else by id;
  one ``vtkMRMLTableNode`` with a row per screw; per X-ray a
  ``vtkMRMLLabelMapVolumeNode`` overlay (0 background, 1 head, 2 shaft) on the
  X-ray's own geometry.

A bare ``vtkMRMLScene`` (slicer-core) lacks what the Slicer application adds:
:func:`setup_scene` adds it (a selection node, the markups logic, a cache
manager inside a data IO manager); :func:`new_scene` makes a scene ready to use.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import slicer
    import vtk
    from vtk.util import numpy_support
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "PedicleScrewPoseLib.mrml needs Slicer's MRML classes: run it inside 3D Slicer, "
        "or `pip install slicer-core==5.11.0.6`"
    ) from exc

from . import geometry

__all__ = [
    "ATTR_PROJECTION_MATRIX",
    "DEFAULT_DETECTOR_DISTANCE_MM",
    "CaseNodes",
    "RunNodes",
    "ScrewNodes",
    "PedicleScrewPoseMRMLLogic",
    "new_scene",
    "setup_scene",
    "add_xray_volume",
    "xray_ijk_to_ras",
    "view_from_volume_node",
    "image_from_volume_node",
    "xray_volume_nodes",
    "add_label_overlay",
    "add_volume",
    "load_volume_file",
    "volume_from_node",
    "load_case_into_scene",
    "add_result",
    "find_runs",
    "run_screws",
    "run_in_scene",
    "save_scene",
    "load_scene",
    "write_scene_for_run",
]

# ----------------------------------------------------------------------------- names
ATTR = "PedicleScrewPose."
ATTR_PROJECTION_MATRIX = ATTR + "ProjectionMatrix"
ATTR_WIDTH = ATTR + "Width"
ATTR_HEIGHT = ATTR + "Height"
ATTR_METAL = ATTR + "Metal"
ATTR_VIEW_NAME = ATTR + "ViewName"
ATTR_DETECTOR_DISTANCE = ATTR + "DetectorDistance_mm"
#: What a node is to this module: "xray", "ct", "vertebra-labels", "screw-labels",
#: "screw-transform", "screw-model", "screw-line", "results-table", "label-colors".
ATTR_ROLE = ATTR + "Role"
ATTR_SCREW_ID = ATTR + "ScrewId"
#: The result's screw entry (JSON) on the screw's transform node, so nothing is lost.
ATTR_SCREW_JSON = ATTR + "Screw"
#: Subject-hierarchy attribute marking a run folder (value: the folder's name).
ATTR_RUN = ATTR + "Run"
ATTR_CASE = ATTR + "Case"

#: Source-to-detector distance used to place an X-ray's image plane when the case
#: does not say (a typical mobile C-arm: ~1000 mm).
DEFAULT_DETECTOR_DISTANCE_MM = 1000.0
#: Voxel size of the marching-cubes screw mesh written into scenes: 0.3 mm keeps a
#: screw at ~25k vertices (the scene stays small) and within ~0.1 mm of the surface.
SCENE_MESH_VOXEL_MM = 0.3

SCREW_LABEL_COLORS = {0: ("background", (0.0, 0.0, 0.0, 0.0)),
                      1: ("head", (1.0, 0.55, 0.0, 1.0)),
                      2: ("shaft", (0.0, 0.75, 1.0, 1.0))}
# Model colours by Gertzbein-Robbins grade (A: contained ... E: > 6 mm out); no grade: steel blue.
GRADE_COLORS = {"A": (0.25, 0.8, 0.3), "B": (0.75, 0.85, 0.2), "C": (1.0, 0.6, 0.1),
                "D": (0.95, 0.25, 0.15), "E": (0.8, 0.1, 0.4)}
NO_GRADE_COLOR = (0.55, 0.7, 0.95)

# ----------------------------------------------------------------------------- results
@dataclass
class ScrewNodes:
    """IDs of one screw's nodes."""

    screw_id: str
    label: str
    transform_node_id: str
    model_node_id: str
    line_node_id: str
    folder_item_id: int


@dataclass
class RunNodes:
    """What :func:`add_result` made: the run folder (subject-hierarchy item) and node IDs."""

    folder_item_id: int
    name: str
    table_node_id: str
    screws: list = field(default_factory=list)  # list[ScrewNodes]
    overlay_node_ids: dict = field(default_factory=dict)  # view name -> labelmap node ID


@dataclass
class CaseNodes:
    """What :func:`load_case_into_scene` made."""

    folder_item_id: int
    xray_nodes: list
    ct_node: object = None
    labels_node: object = None


# ----------------------------------------------------------------------------- scene
def new_scene():
    """A new ``vtkMRMLScene`` set up like the Slicer application's (see :func:`setup_scene`)."""
    return setup_scene(slicer.vtkMRMLScene())


def setup_scene(scene):
    """Add to ``scene`` what a bare slicer-core scene lacks; parts already there are left alone.

    * a ``vtkMRMLSelectionNode`` (markups read their units from it);
    * ``vtkSlicerMarkupsLogic`` set on the scene (registers the markups node and
      storage classes used when saving and reading scenes);
    * a ``vtkCacheManager`` (with a remote cache folder) inside a
      ``vtkDataIOManager``: ``ReadFromMRB`` fails without them.

    Inside Slicer, ``slicer.mrmlScene`` already has all three: nothing is added.
    Returns the scene.
    """
    if scene is None:
        raise ValueError("setup_scene: scene is None")
    if scene.GetFirstNodeByClass("vtkMRMLSelectionNode") is None:
        scene.AddNode(slicer.vtkMRMLSelectionNode())
    if not scene.IsNodeClassRegistered("vtkMRMLMarkupsJsonStorageNode"):
        # Registering is all we need from the logic: the classes stay registered after it lets go.
        logic = slicer.vtkSlicerMarkupsLogic()
        logic.SetMRMLScene(scene)
        logic.SetMRMLScene(None)
    if scene.GetCacheManager() is None or scene.GetDataIOManager() is None:
        cache = slicer.vtkCacheManager()
        cache.SetRemoteCacheDirectory(_cache_dir())
        dio = slicer.vtkDataIOManager()
        dio.SetCacheManager(cache)
        scene.SetCacheManager(cache)
        scene.SetDataIOManager(dio)
    return scene


def _cache_dir() -> str:
    # One folder per process (nothing is downloaded into it; ReadFromMRB only needs it to exist).
    global _CACHE_DIR
    if _CACHE_DIR is None or not os.path.isdir(_CACHE_DIR):
        _CACHE_DIR = tempfile.mkdtemp(prefix="pedicle-screw-pose-cache-")
    return _CACHE_DIR


_CACHE_DIR = None


# ----------------------------------------------------------------------------- X-rays
def xray_ijk_to_ras(view: geometry.View, detector_distance_mm: float | None = None) -> np.ndarray:
    """IJK-to-RAS (4,4) putting an X-ray's pixels on the detector plane in world RAS mm.

    Voxel ``(i, j, 0)`` = pixel ``(u, v)`` lies on its ray at depth ``d`` (mm from
    the source along the central axis): ``X = R^T (d K^-1 [u, v, 1] - t)``.  The
    k axis is the beam direction (1 mm).  Detector skew, if any, is dropped (Slicer
    volumes have orthogonal axes); ``P`` stays in the node attribute, exact.
    """
    d = float(detector_distance_mm or detector_distance_mm_of(view))
    K = np.array(view.K, float)
    K[0, 1] = 0.0
    Kinv = np.linalg.inv(K)
    Rt = np.asarray(view.R, float).T
    M = np.eye(4)
    M[:3, 0] = d * Rt @ Kinv[:, 0]
    M[:3, 1] = d * Rt @ Kinv[:, 1]
    M[:3, 2] = np.asarray(view.R, float)[2]
    M[:3, 3] = d * Rt @ Kinv[:, 2] + view.source_mm
    return M


def detector_distance_mm_of(view: geometry.View) -> float:
    """Source-to-detector distance (mm): the case's ``sdd_mm``, else ``|f| * pixel_mm``, else the default."""
    extra = getattr(view, "extra", None) or {}
    for key in ("sdd_mm", "source_to_detector_mm"):
        if _positive(extra.get(key)):
            return float(extra[key])
    for key in ("pixel_mm", "pixel_spacing_mm"):
        if _positive(extra.get(key)):
            return abs(float(view.K[0, 0])) * float(extra[key])
    return DEFAULT_DETECTOR_DISTANCE_MM


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def add_xray_volume(scene, image, view: geometry.View, name: str | None = None, metal: str | None = None,
                    detector_distance_mm: float | None = None):
    """Add one X-ray as a ``vtkMRMLScalarVolumeNode`` with its geometry in attributes.

    ``image``: ``[v, u]`` array (uint8, uint16 or float; float64 is stored as
    float32), ``view``: its calibrated view (``view.width``/``height`` must match).
    The node's name is ``name`` or the view's name; ``PedicleScrewPose.ViewName``
    keeps the view's name even if Slicer renames the node.
    """
    arr = _as_image(image, f"X-ray {name or view.name!r}")
    h, w = arr.shape
    if (w, h) != (int(view.width), int(view.height)):
        raise ValueError(f"X-ray {name or view.name!r}: image is {w}x{h} px but the view says "
                         f"{view.width}x{view.height}")
    metal = metal if metal is not None else view.metal
    if metal not in (None, "bright", "dark"):
        raise ValueError(f"X-ray {name or view.name!r}: metal is {metal!r}, expected 'bright' or 'dark'")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or view.name)
    node.SetAndObserveImageData(_image_data(arr[np.newaxis]))
    d = float(detector_distance_mm or detector_distance_mm_of(view))
    node.SetIJKToRASMatrix(_vtk_matrix(xray_ijk_to_ras(view, d)))
    P = np.asarray(view.P, float)
    node.SetAttribute(ATTR_PROJECTION_MATRIX, " ".join(repr(float(x)) for x in P.ravel()))
    node.SetAttribute(ATTR_WIDTH, str(int(w)))
    node.SetAttribute(ATTR_HEIGHT, str(int(h)))
    node.SetAttribute(ATTR_VIEW_NAME, str(view.name))
    node.SetAttribute(ATTR_DETECTOR_DISTANCE, repr(d))
    node.SetAttribute(ATTR_ROLE, "xray")
    if metal:
        node.SetAttribute(ATTR_METAL, metal)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        lo, hi = np.percentile(arr, [0.5, 99.5])
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(float(lo), float(hi if hi > lo else lo + 1))
    return node


def view_from_volume_node(node) -> geometry.View:
    """The calibrated view of an X-ray volume node (from its attributes).

    Raises ``ValueError`` naming the node when the projection matrix is missing
    or malformed, or when the image does not match the stored width and height.
    Reads only: the scene is never changed.
    """
    if node is None:
        raise ValueError("X-ray volume node is None")
    label = f"volume {node.GetName()!r} ({node.GetID()})"
    text = node.GetAttribute(ATTR_PROJECTION_MATRIX)
    if not text:
        raise ValueError(
            f"{label} has no projection matrix: set its attribute {ATTR_PROJECTION_MATRIX} to the 12 numbers "
            "of P (row by row), or load the X-rays from a case.json"
        )
    try:
        values = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{label}: attribute {ATTR_PROJECTION_MATRIX} must be 12 numbers, got {text!r}") from None
    if len(values) != 12 or not all(math.isfinite(x) for x in values):
        raise ValueError(f"{label}: attribute {ATTR_PROJECTION_MATRIX} must be 12 finite numbers, got {text!r}")
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"{label} has no image data")
    dims = image.GetDimensions()
    if dims[2] != 1:
        raise ValueError(f"{label}: an X-ray must be a single slice, the volume has {dims[2]} slices")
    width = _int_attr(node, ATTR_WIDTH, dims[0], label)
    height = _int_attr(node, ATTR_HEIGHT, dims[1], label)
    if (width, height) != (dims[0], dims[1]):
        raise ValueError(f"{label}: the image is {dims[0]}x{dims[1]} px but its attributes say {width}x{height}")
    metal = node.GetAttribute(ATTR_METAL) or None
    if metal not in (None, "bright", "dark"):
        raise ValueError(f"{label}: attribute {ATTR_METAL} is {metal!r}, expected 'bright' or 'dark'")
    name = node.GetAttribute(ATTR_VIEW_NAME) or node.GetName()
    try:
        return geometry.View.from_P(np.array(values).reshape(3, 4), width, height, name=name, metal=metal)
    except ValueError as exc:
        raise ValueError(f"{label}: {ATTR_PROJECTION_MATRIX}: {exc}") from None


def image_from_volume_node(node) -> np.ndarray:
    """The X-ray's pixels, a copy ``[v, u]`` in the node's scalar type."""
    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume {node.GetName()!r} has no image data")
    w, h, k = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return np.array(arr.reshape(k, h, w)[0])


def xray_volume_nodes(scene) -> list:
    """Every scalar volume node of the scene carrying a projection matrix, in scene order."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    out = []
    for i in range(nodes.GetNumberOfItems()):
        n = nodes.GetItemAsObject(i)
        if n.GetAttribute(ATTR_PROJECTION_MATRIX) and not n.IsA("vtkMRMLLabelMapVolumeNode"):
            out.append(n)
    return out


def add_label_overlay(scene, xray_node, labels, name: str | None = None):
    """A ``vtkMRMLLabelMapVolumeNode`` (0 background, 1 head, 2 shaft) on the X-ray's geometry."""
    lab = np.asarray(labels)
    label = f"label map for volume {xray_node.GetName()!r}"
    _check_overlay(xray_node, lab, label)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name or f"{xray_node.GetName()} labels")
    node.SetAndObserveImageData(_image_data(lab.astype(np.uint8)[np.newaxis]))
    m = vtk.vtkMatrix4x4()
    xray_node.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    node.SetAttribute(ATTR_ROLE, "screw-labels")
    node.SetAttribute(ATTR_VIEW_NAME, xray_node.GetAttribute(ATTR_VIEW_NAME) or xray_node.GetName())
    _labelmap_display(scene, node, _color_table(scene, "PedicleScrewPose screw labels", SCREW_LABEL_COLORS))
    return node


def _labelmap_display(scene, node, color):
    """Give a label map its display node with ``color`` (made by hand: the default display node
    wants Slicer's "Labels" colour table, which a bare scene does not have)."""
    display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    node.SetAndObserveDisplayNodeID(display.GetID())
    return display


def _check_overlay(xray_node, lab, label):
    image = xray_node.GetImageData()
    dims = image.GetDimensions() if image is not None else (0, 0, 0)
    if lab.ndim != 2 or lab.shape != (dims[1], dims[0]):
        raise ValueError(f"{label}: shape {lab.shape} does not match the X-ray's {dims[1]}x{dims[0]} [v, u]")
    if lab.size and (lab.min() < 0 or lab.max() > 2):
        raise ValueError(f"{label}: values must be 0 (background), 1 (head) or 2 (shaft), "
                         f"got {lab.min()}..{lab.max()}")


# ----------------------------------------------------------------------------- CT and labels
def add_volume(scene, volume, name: str, labelmap: bool = False, label_names: dict | None = None):
    """Add a 3D ``ct.Volume``-like object (``array [k, j, i]``, ``ijk_to_ras`` (4,4)) as a volume node.

    ``labelmap=True`` makes a ``vtkMRMLLabelMapVolumeNode`` whose colour table names
    the labels (``label_names`` or the volume's ``names``, e.g. {32: "T12"}).
    """
    arr = np.asarray(volume.array)
    if arr.ndim != 3:
        raise ValueError(f"volume {name!r}: array must be 3D [k, j, i], got shape {arr.shape}")
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    node.SetAndObserveImageData(_image_data(arr))
    node.SetIJKToRASMatrix(_vtk_matrix(np.asarray(volume.ijk_to_ras, float)))
    names = label_names if label_names is not None else getattr(volume, "names", None)
    _finish_volume(scene, node, labelmap, names)
    return node


def load_volume_file(scene, path, name: str | None = None, labelmap: bool = False,
                     label_names: dict | None = None):
    """Read a CT or label file (NIfTI, NRRD, MHA, ...) with Slicer's own reader (LPS files → RAS)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume file {path} does not exist")
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or _stem(path))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if labelmap:
        storage.SetCenterImage(0)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise ValueError(f"volume file {path} could not be read")
    _finish_volume(scene, node, labelmap, label_names)
    return node


def _finish_volume(scene, node, labelmap, names):
    node.SetAttribute(ATTR_ROLE, "vertebra-labels" if labelmap else "ct")
    if labelmap:
        names = {int(k): str(v) for k, v in (names or {}).items()}
        color = None
        if names:
            rng = np.random.default_rng(7)  # fixed colours: the same labels look the same every time
            entries = {0: ("background", (0, 0, 0, 0))}
            for value in range(1, max(names) + 1):
                rgb = tuple(float(x) for x in rng.uniform(0.25, 1.0, 3))
                entries[value] = (names.get(value, f"label {value}"), rgb + ((1.0,) if value in names else (0.0,)))
            color = _color_table(scene, f"{node.GetName()} colors", entries)
            node.SetAttribute(ATTR + "LabelNames", json.dumps({str(k): v for k, v in sorted(names.items())}))
        else:
            color = scene.GetFirstNodeByName("GenericAnatomyColors") or scene.GetNodeByID("vtkMRMLColorTableNodeLabels")
        _labelmap_display(scene, node, color)
        return
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        # A bone window shows the vertebrae and the screws' metal.
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(1500.0, 400.0)


def volume_from_node(node):
    """A ``ct.Volume`` (or ``ct.LabelVolume`` for a label map node) with the node's voxels and geometry."""
    from . import ct as ctmod

    image = node.GetImageData() if node is not None else None
    if image is None:
        raise ValueError(f"volume {node.GetName() if node else None!r} has no image data")
    i, j, k = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    M = _numpy_matrix(m)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        names = {}
        text = node.GetAttribute(ATTR + "LabelNames")
        if text:
            names = {int(a): b for a, b in json.loads(text).items()}
        return ctmod.LabelVolume(array=arr, ijk_to_ras=M, names=names)
    return ctmod.Volume(array=arr, ijk_to_ras=M)


# ----------------------------------------------------------------------------- case
def load_case_into_scene(scene, case, name: str | None = None) -> CaseNodes:
    """Put an ``io.Case`` into the scene: its X-rays (with their ``P``), its CT and labels if any.

    Everything goes into one subject-hierarchy folder named after the case.
    """
    views = list(case.views)
    images = list(case.images)
    if len(views) != len(images) or any(im is None for im in images):
        raise ValueError(f"case {getattr(case, 'root', '')}: images were not loaded (read_case(load_images=True))")
    for view, image in zip(views, images):  # validate all before adding any node
        arr = _as_image(image, f"view {view.name!r}")
        if arr.shape != (view.height, view.width):
            raise ValueError(f"view {view.name!r}: image shape {arr.shape} != {view.height}x{view.width}")
    root = getattr(case, "root", None)
    folder_name = name or f"PedicleScrewPose case {Path(root).name if root else ''}".strip()
    sh = _sh(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), folder_name)
    sh.SetItemAttribute(folder, ATTR_CASE, str(root or ""))
    xrays = []
    for view, image in zip(views, images):
        node = add_xray_volume(scene, _compact_image(image), view, name=view.name)
        _parent(sh, node, folder)
        xrays.append(node)
    ct_node = labels_node = None
    ct_path = getattr(case, "ct_path", None)
    if ct_path:
        ct_node = load_volume_file(scene, _case_path(case, ct_path), name="CT")
        _parent(sh, ct_node, folder)
    labels_path = getattr(case, "labels_path", None)
    if labels_path:
        labels_node = load_volume_file(scene, _case_path(case, labels_path), name="vertebra labels",
                                       labelmap=True, label_names=getattr(case, "label_names", None) or {})
        _parent(sh, labels_node, folder)
    return CaseNodes(folder_item_id=folder, xray_nodes=xrays, ct_node=ct_node, labels_node=labels_node)


def _case_path(case, p) -> Path:
    p = Path(p)
    if not p.is_absolute() and getattr(case, "root", None):
        p = Path(case.root) / p
    return p


# ----------------------------------------------------------------------------- result
def add_result(scene, result: dict, name: str = "PedicleScrewPose run", ct_node=None, label_maps=None,
               xray_nodes=None, mesh_voxel_mm: float = SCENE_MESH_VOXEL_MM) -> RunNodes:
    """Add one result (the ``result.json`` dict) to the scene as a new run folder.

    Per screw: a transform node (``T_world_from_screw`` = the screw's
    ``transform``), a model (the screw mesh of its diameter and length, screw
    frame) and a line entry → tip, both observing the transform; one results
    table; per view in ``label_maps`` (view name → uint8 ``[v, u]``) an overlay on
    that view's X-ray node (from ``xray_nodes``, else the scene's X-ray nodes with
    that view name).  A second call makes a second folder ("... 2"), never
    touching the first.  Everything is checked before any node is added: on bad
    input ``ValueError`` and the scene is unchanged.  ``ct_node`` (optional) is
    recorded on the folder as the CT the screws were assessed on.
    """
    screws = _checked_screws(result)
    overlays = _checked_overlays(scene, label_maps, xray_nodes)
    from . import screw as screwmod  # the mesh of each size

    sh = _sh(scene)
    folder_name = _unique_folder_name(sh, name)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), folder_name)
    sh.SetItemAttribute(folder, ATTR_RUN, folder_name)
    if ct_node is not None:
        sh.SetItemAttribute(folder, ATTR + "CTNodeID", ct_node.GetID())
    run = RunNodes(folder_item_id=folder, name=folder_name, table_node_id="")
    labels = _screw_labels(screws)
    meshes = {}
    for s, label in zip(screws, labels):
        key = (s["diameter_mm"], s["length_mm"])
        if key not in meshes:
            meshes[key] = screwmod.screw_mesh(screwmod.ScrewSpec.from_size(*key), voxel_mm=mesh_voxel_mm)
        run.screws.append(_add_screw(scene, sh, folder, s, label, meshes[key]))
    table = _add_table(scene, screws, labels, f"{folder_name} screws")
    _parent(sh, table, folder)
    run.table_node_id = table.GetID()
    for view_name, (xray, lab) in overlays.items():
        node = add_label_overlay(scene, xray, lab, name=f"{xray.GetName()} screw labels ({folder_name})")
        _parent(sh, node, folder)
        run.overlay_node_ids[view_name] = node.GetID()
    return run


def _checked_screws(result) -> list:
    if not isinstance(result, dict) or not isinstance(result.get("screws"), list):
        raise ValueError("result must be a dict with a 'screws' list (pedicle-screw-result/1)")
    out = []
    seen = set()
    for i, s in enumerate(result["screws"]):
        where = f"result screws[{i}]"
        if not isinstance(s, dict):
            raise ValueError(f"{where} must be an object")
        sid = str(s.get("id", f"S{i + 1}"))
        if sid in seen:
            raise ValueError(f"{where}: id {sid!r} is used twice")
        seen.add(sid)
        try:
            T = np.asarray(s.get("transform"), dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{where} ({sid}): 'transform' must be a 4x4 matrix") from None
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"{where} ({sid}): 'transform' must be a finite 4x4 matrix, got shape {T.shape}")
        R = T[:3, :3]
        if not np.allclose(R.T @ R, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0 or not np.allclose(
                T[3], [0, 0, 0, 1]):
            raise ValueError(f"{where} ({sid}): 'transform' must be rigid (rotation + translation)")
        for key in ("diameter_mm", "length_mm"):
            x = s.get(key)
            if not _positive(x):
                raise ValueError(f"{where} ({sid}): '{key}' must be a positive number, got {x!r}")
        item = dict(s)
        item["id"] = sid
        item["transform"] = T
        item["diameter_mm"] = float(s["diameter_mm"])
        item["length_mm"] = float(s["length_mm"])
        out.append(item)
    return out


def _checked_overlays(scene, label_maps, xray_nodes) -> dict:
    if not label_maps:
        return {}
    candidates = list(xray_nodes) if xray_nodes is not None else xray_volume_nodes(scene)
    by_view = {}
    for n in candidates:  # the last added node of a view name wins
        by_view[n.GetAttribute(ATTR_VIEW_NAME) or n.GetName()] = n
    out = {}
    for view_name, lab in label_maps.items():
        xray = by_view.get(view_name)
        if xray is None:
            raise ValueError(f"label map for view {view_name!r}: no X-ray volume of that view in the scene "
                             f"(views: {sorted(by_view)})")
        lab = np.asarray(lab)
        _check_overlay(xray, lab, f"label map for view {view_name!r}")
        out[view_name] = (xray, lab)
    return out


def _screw_labels(screws) -> list:
    """'T12 left' when level and side are known, else the id; made unique."""
    labels, used = [], {}
    for s in screws:
        level, side = s.get("level"), s.get("side")
        label = f"{level} {side}" if level and side else (f"{level} {s['id']}" if level else s["id"])
        if label in used:
            used[label] += 1
            label = f"{label} ({s['id']})"
        else:
            used[label] = 1
        labels.append(label)
    return labels


def _add_screw(scene, sh, folder, s, label, mesh) -> ScrewNodes:
    color = GRADE_COLORS.get(_grade(s), NO_GRADE_COLOR)
    sub = sh.CreateFolderItem(folder, label)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", f"{label} T_world_from_screw")
    transform.SetMatrixTransformToParent(_vtk_matrix(s["transform"]))
    transform.SetAttribute(ATTR_ROLE, "screw-transform")
    transform.SetAttribute(ATTR_SCREW_ID, s["id"])
    transform.SetAttribute(ATTR_SCREW_JSON, json.dumps(_jsonable(s)))
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", f"{label} screw")
    poly = vtk.vtkPolyData()
    poly.DeepCopy(mesh)
    model.SetAndObservePolyData(poly)
    storage = model.CreateDefaultStorageNode()
    storage.SetDefaultWriteFileExtension("vtp")  # compressed XML: ~40 % smaller than legacy .vtk
    scene.AddNode(storage)
    storage.UnRegister(None)  # CreateDefaultStorageNode hands over a reference
    model.SetAndObserveStorageNodeID(storage.GetID())
    model.SetAttribute(ATTR_ROLE, "screw-model")
    model.SetAttribute(ATTR_SCREW_ID, s["id"])
    model.SetDescription(f"{s['diameter_mm']:g} x {s['length_mm']:g} mm pedicle screw, screw frame "
                         "(origin at the entry point, +z to the tip)")
    model.CreateDefaultDisplayNodes()
    md = model.GetDisplayNode()
    md.SetColor(*color)
    md.SetVisibility2D(True)  # the screw's outline on the CT slices
    md.SetSliceIntersectionThickness(2)
    model.SetAndObserveTransformNodeID(transform.GetID())
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", label)
    line.SetAttribute(ATTR_ROLE, "screw-line")
    line.SetAttribute(ATTR_SCREW_ID, s["id"])
    # Screw-frame points: the line follows the transform, like the model.
    line.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), "entry")
    line.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, s["length_mm"]), "tip")
    line.SetLocked(True)
    line.CreateDefaultDisplayNodes()
    ld = line.GetDisplayNode()
    if ld is not None:
        ld.SetSelectedColor(*color)
        ld.SetColor(*color)
    line.SetAndObserveTransformNodeID(transform.GetID())
    for n in (transform, model, line):
        _parent(sh, n, sub)
    return ScrewNodes(screw_id=s["id"], label=label, transform_node_id=transform.GetID(),
                      model_node_id=model.GetID(), line_node_id=line.GetID(), folder_item_id=sub)


def _grade(s):
    b = s.get("breach")
    return b.get("grade") if isinstance(b, dict) else None


# Fixed columns first; then whatever else the assessment added (numbers or text, one level of dicts flattened).
_SKIP_KEYS = {"id", "transform", "views", "entry_mm", "tip_mm", "level", "side", "diameter_mm", "length_mm",
              "confidence", "breach"}
_UNITS = {"mm": "mm", "deg": "deg"}


def _table_rows(screws, labels):
    rows = []
    for s, label in zip(screws, labels):
        T = s["transform"]
        entry = np.asarray(s.get("entry_mm", T[:3, 3]), float)
        tip = np.asarray(s.get("tip_mm", T[:3, 3] + s["length_mm"] * T[:3, 2]), float)
        row = {"id": s["id"], "label": label, "level": s.get("level") or "", "side": s.get("side") or "",
               "diameter_mm": s["diameter_mm"], "length_mm": s["length_mm"],
               "entry_R_mm": entry[0], "entry_A_mm": entry[1], "entry_S_mm": entry[2],
               "tip_R_mm": tip[0], "tip_A_mm": tip[1], "tip_S_mm": tip[2],
               "confidence": s.get("confidence")}
        b = s.get("breach")
        if isinstance(b, dict):
            row["breach_grade"] = b.get("grade") or ""
            row["breach_max_mm"] = b.get("max_mm")
            for k, v in b.items():
                if k not in ("grade", "max_mm"):
                    row[f"breach_{k}"] = v
        for k, v in s.items():
            if k in _SKIP_KEYS:
                continue
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    row[f"{k}_{k2}"] = v2
            else:
                row[k] = v
        rows.append(row)
    return rows


def _add_table(scene, screws, labels, name):
    rows = _table_rows(screws, labels)
    columns = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table.SetAttribute(ATTR_ROLE, "results-table")
    for col in columns:
        values = [r.get(col) for r in rows]
        numeric = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
        if numeric and any(v is not None for v in values):
            arr = vtk.vtkDoubleArray()
            for v in values:
                arr.InsertNextValue(float("nan") if v is None else float(v))
        else:
            arr = vtk.vtkStringArray()
            for v in values:
                arr.InsertNextValue("" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v)))
        arr.SetName(col)
        table.AddColumn(arr)
        unit = col.rsplit("_", 1)[-1]
        if unit in _UNITS:
            table.SetColumnUnitLabel(col, _UNITS[unit])
    table.SetColumnDescription("entry_R_mm", "entry point (shaft meets head), world RAS")
    table.SetColumnDescription("tip_R_mm", "screw tip, world RAS")
    table.SetLocked(True)
    return table


def find_runs(scene) -> list:
    """Run folders in the scene, oldest first: list of ``(folder item ID, name)``."""
    sh = _sh(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, False)
    out = []
    for i in range(ids.GetNumberOfIds()):
        item = ids.GetId(i)
        if sh.HasItemAttribute(item, ATTR_RUN):
            out.append((item, sh.GetItemName(item)))
    return out


def run_screws(scene, folder_item_id) -> list:
    """Read one run's screws back from its nodes.

    Returns a list of dicts: ``id``, ``label``, ``T_world_from_screw`` (4,4, from
    the transform node), ``diameter_mm``, ``length_mm``, ``level``, ``side``,
    ``transform_node``, ``model_node``, ``line_node``.
    """
    sh = _sh(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(folder_item_id, ids, True)
    by_id = {}
    for i in range(ids.GetNumberOfIds()):
        node = sh.GetItemDataNode(ids.GetId(i))
        if node is None or not node.GetAttribute(ATTR_ROLE):
            continue
        sid = node.GetAttribute(ATTR_SCREW_ID)
        role = node.GetAttribute(ATTR_ROLE)
        if sid is None or role not in ("screw-transform", "screw-model", "screw-line"):
            continue
        by_id.setdefault(sid, {})[role] = node
    out = []
    for sid, nodes in by_id.items():
        t = nodes.get("screw-transform")
        if t is None:
            continue
        m = vtk.vtkMatrix4x4()
        t.GetMatrixTransformToParent(m)
        info = json.loads(t.GetAttribute(ATTR_SCREW_JSON) or "{}")
        line = nodes.get("screw-line")
        out.append({"id": sid, "label": line.GetName() if line is not None else sid,
                    "T_world_from_screw": _numpy_matrix(m),
                    "diameter_mm": info.get("diameter_mm"), "length_mm": info.get("length_mm"),
                    "level": info.get("level"), "side": info.get("side"),
                    "transform_node": t, "model_node": nodes.get("screw-model"), "line_node": line})
    return out


# ----------------------------------------------------------------------------- run
def run_in_scene(scene, xray_nodes, ct_node=None, labels_node=None, device: str = "cpu", progress=None,
                 run_case=None, implants=None, name: str = "PedicleScrewPose run", work_dir=None):
    """Run the pipeline on X-ray nodes of the scene and add the result as a new run folder.

    ``xray_nodes``: two or more volume nodes with projection matrices
    (:func:`view_from_volume_node`); ``ct_node``/``labels_node``: optional CT
    and vertebra label map (level, side and breach need them); ``implants``:
    optional implant log (``[{diameter_mm, length_mm}]``).  ``run_case``
    defaults to ``pipeline.run_case`` (``run_case(case, out_dir=..., device=...)
    -> result dict``); tests and other front-ends may pass their own.
    ``progress(fraction, message)`` is called along the way.

    Every input is checked before anything runs; on bad input ``ValueError``
    naming the node, and the scene is left exactly as it was.  The case handed
    to the pipeline is written to a temporary folder (``work_dir`` to keep it)
    in the case-folder format, so the pipeline sees exactly what ``run`` sees.
    Returns ``(RunNodes, result dict)``.
    """
    from . import io

    report = progress or (lambda fraction, message: None)
    report(0.0, "checking inputs")
    nodes = [n for n in (xray_nodes or []) if n is not None]
    if len(nodes) < 2:
        raise ValueError(f"need two or more X-ray volumes, got {len(nodes)}")
    views = [view_from_volume_node(n) for n in nodes]
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise ValueError(f"X-ray views must have different names, got {names}")
    for n, label in ((ct_node, "CT"), (labels_node, "vertebra labels")):
        if n is not None and (not n.IsA("vtkMRMLVolumeNode") or n.GetImageData() is None):
            raise ValueError(f"{label} node {n.GetName()!r} is not a volume with image data")
    if labels_node is not None and not labels_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"vertebra labels node {labels_node.GetName()!r} must be a label map volume")
    if run_case is None:
        from .pipeline import run_case

    tmp = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="pedicle-screw-pose-run-"))
    try:
        report(0.05, "writing the case")
        images = [_compact_image(image_from_volume_node(n)) for n in nodes]
        fmt = "png" if all(im.dtype in (np.uint8, np.uint16) for im in images) else "nrrd"
        ct_path = _volume_file(ct_node, tmp / "ct.nii") if ct_node is not None else None
        labels_path = _volume_file(labels_node, tmp / "labels.nii") if labels_node is not None else None
        label_names = None
        if labels_node is not None and labels_node.GetAttribute(ATTR + "LabelNames"):
            label_names = {int(k): v for k, v in json.loads(labels_node.GetAttribute(ATTR + "LabelNames")).items()}
        case_dir = tmp / "case"
        io.write_case(case_dir, views, images, implants=implants, ct=ct_path, labels=labels_path,
                      label_names=label_names, image_format=fmt, overwrite=True)
        case = io.read_case(case_dir)
        report(0.1, "finding the screws")
        out_dir = tmp / "result"
        out_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {}
        if _accepts(run_case, "progress"):
            # The pipeline names its stages; map them onto the bar between 10 % and 90 %.
            kwargs["progress"] = lambda stage: report(_STAGE_FRACTION.get(stage, 0.5), str(stage))
        result = run_case(case, out_dir=out_dir, device=device, **kwargs)
        report(0.9, "adding the screws to the scene")
        label_maps = {}
        for v in views:
            p = out_dir / f"{io.safe_view_filename(v.name)}_labels.png"
            if p.exists():
                label_maps[v.name] = io.read_image(p).astype(np.uint8)
        run = add_result(scene, result, name=name, ct_node=ct_node, label_maps=label_maps, xray_nodes=nodes)
    finally:
        if not work_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    report(1.0, f"{len(run.screws)} screws")
    return run, result


_STAGE_FRACTION = {"segmentation": 0.15, "instances": 0.45, "correspondence": 0.5, "pose": 0.55, "outputs": 0.85}


def _accepts(func, name) -> bool:
    import inspect

    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _volume_file(node, path: Path) -> Path:
    """A file holding the node's voxels: its own file when unchanged since read, else a new one."""
    storage = node.GetStorageNode()
    if storage is not None and storage.GetFileName() and os.path.exists(storage.GetFileName()) \
            and not node.GetModifiedSinceRead():
        return Path(storage.GetFileName())
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
    writer.SetFileName(str(path))
    writer.SetUseCompression(0)
    if not writer.WriteData(node):
        raise ValueError(f"could not write volume {node.GetName()!r} to {path}")
    return path


# ----------------------------------------------------------------------------- files
def save_scene(scene, path) -> Path:
    """Write the scene with all its data, atomically.

    ``.mrb``: one zip bundle (``WriteToMRB``) written to a temporary file in the
    same folder, then renamed.  ``.mrml``: the scene file plus its data files in a
    ``<name>-data`` folder beside it; data first, the ``.mrml`` last by rename.
    """
    path = Path(path).resolve()
    suffix = path.suffix.lower()
    if suffix not in (".mrb", ".mrml"):
        raise ValueError(f"scene file {path}: use a .mrb (bundle) or .mrml name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mrb":
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mrb", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)  # WriteToMRB wants to create the file itself
        try:
            with _quiet_vtk():
                ok = scene.WriteToMRB(tmp)
            if not ok or not os.path.exists(tmp):
                raise ValueError(f"could not write scene bundle {path}")
            _chmod_like_new_file(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path
    data_dir = path.parent / f"{path.stem}-data"
    data_dir.mkdir(exist_ok=True)
    used = set()
    nodes = scene.GetNodesByClass("vtkMRMLStorableNode")
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if not node.GetSaveWithScene():
            continue
        storage = node.GetStorageNode()
        if storage is None:
            if not node.AddDefaultStorageNode():
                continue
            storage = node.GetStorageNode()
        if storage is None:
            continue
        ext = storage.GetDefaultWriteFileExtension() or "dat"
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in node.GetName()) or node.GetID()
        while stem in used:
            stem += "_"
        used.add(stem)
        storage.SetFileName(str(data_dir / f"{stem}.{ext}"))
        with _quiet_vtk():
            if not storage.WriteData(node):
                raise ValueError(f"could not write {node.GetName()!r} to {storage.GetFileName()}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mrml", dir=path.parent)
    os.close(fd)
    try:
        scene.SetRootDirectory(str(path.parent))
        scene.SetURL(str(path))
        with _quiet_vtk():
            ok = scene.Commit(tmp)
        if not ok:
            raise ValueError(f"could not write scene {path}")
        _chmod_like_new_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _chmod_like_new_file(path) -> None:
    """mkstemp makes 0600 files; give the final file the mode a plain open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_scene(path, scene=None):
    """Read a ``.mrb`` or ``.mrml`` scene into ``scene`` (a new set-up scene by default); returns it."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"scene file {path} does not exist")
    scene = setup_scene(scene if scene is not None else slicer.vtkMRMLScene())
    with _quiet_vtk():
        if path.suffix.lower() == ".mrb":
            ok = scene.ReadFromMRB(str(path))
        elif path.suffix.lower() == ".mrml":
            scene.SetURL(str(path))
            ok = scene.Import()
        else:
            raise ValueError(f"scene file {path}: expected .mrb or .mrml")
    if not ok:
        raise ValueError(f"could not read scene {path}")
    return scene


def write_scene_for_run(out_dir, case, result: dict, label_maps: dict | None = None,
                        filename: str = "scene.mrb") -> Path:
    """Write ``out_dir/scene.mrb``: the case's CT, labels and X-rays, the screws, the table, the overlays.

    ``label_maps`` (view name → uint8 ``[v, u]``) defaults to the
    ``<view>_labels.png`` files ``run`` wrote into ``out_dir``, where present.
    Opens in Slicer (File > Add Data, or drag and drop) with the screws in place on the CT.
    """
    from . import io

    out_dir = Path(out_dir)
    if label_maps is None:
        label_maps = {}
        for v in case.views:
            p = out_dir / f"{io.safe_view_filename(v.name)}_labels.png"
            if p.exists():
                label_maps[v.name] = io.read_image(p).astype(np.uint8)
    scene = new_scene()
    nodes = load_case_into_scene(scene, case)
    add_result(scene, result, ct_node=nodes.ct_node, label_maps=label_maps, xray_nodes=nodes.xray_nodes)
    return save_scene(scene, out_dir / filename)


# ----------------------------------------------------------------------------- class facade
class PedicleScrewPoseMRMLLogic:
    """The functions above bound to one scene (what the Slicer module's Logic holds)."""

    def __init__(self, scene):
        if scene is None:
            raise ValueError("PedicleScrewPoseMRMLLogic needs a vtkMRMLScene")
        self.scene = setup_scene(scene)

    def load_case(self, case, name=None) -> CaseNodes:
        return load_case_into_scene(self.scene, case, name=name)

    def add_xray(self, image, view, name=None, metal=None):
        return add_xray_volume(self.scene, image, view, name=name, metal=metal)

    def add_result(self, result, **kwargs) -> RunNodes:
        return add_result(self.scene, result, **kwargs)

    def run(self, xray_nodes, **kwargs):
        return run_in_scene(self.scene, xray_nodes, **kwargs)

    def runs(self) -> list:
        return find_runs(self.scene)

    def screws(self, folder_item_id) -> list:
        return run_screws(self.scene, folder_item_id)

    def save(self, path) -> Path:
        return save_scene(self.scene, path)


# ----------------------------------------------------------------------------- helpers
def _sh(scene):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise ValueError("the scene has no subject hierarchy")
    return sh


def _parent(sh, node, folder):
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    sh.SetItemParent(item, folder)


def _unique_folder_name(sh, name):
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, False)
    taken = {sh.GetItemName(ids.GetId(i)) for i in range(ids.GetNumberOfIds())}
    if name not in taken:
        return name
    n = 2
    while f"{name} {n}" in taken:
        n += 1
    return f"{name} {n}"


def _color_table(scene, name, entries: dict):
    """A user colour table (value -> (name, rgba)), made once per scene and name."""
    node = scene.GetFirstNodeByName(name)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(max(entries) + 1)
    for value in range(max(entries) + 1):
        label, rgba = entries.get(value, (f"label {value}", (0.0, 0.0, 0.0, 0.0)))
        node.SetColor(value, label, *[float(x) for x in rgba])
    node.SetAttribute(ATTR_ROLE, "label-colors")
    return node


def _as_image(image, where) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{where}: image must be a 2D [v, u] array, got shape {arr.shape}")
    if arr.dtype.kind not in "uif" and arr.dtype != np.bool_:
        raise ValueError(f"{where}: image must be numeric, got {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: image contains NaN or infinite values")
    return arr


def _compact_image(image) -> np.ndarray:
    """Integers stored as float (what ``io.read_image`` gives for PNGs) go back to uint8/uint16: lossless, smaller."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.dtype.kind == "f":
        if arr.size and np.all(np.isfinite(arr)) and arr.min() >= 0 and np.all(arr == np.round(arr)):
            top = arr.max()
            if top <= 255:
                return arr.astype(np.uint8)
            if top <= 65535:
                return arr.astype(np.uint16)
        return arr.astype(np.float32)
    return arr


def _image_data(arr3) -> "vtk.vtkImageData":
    """vtkImageData from a ``[k, j, i]`` array (i fastest), spacing 1, origin 0 (the node holds the geometry)."""
    arr3 = np.ascontiguousarray(arr3)
    k, j, i = arr3.shape
    img = vtk.vtkImageData()
    img.SetDimensions(int(i), int(j), int(k))
    scalars = numpy_support.numpy_to_vtk(arr3.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    img.GetPointData().SetScalars(scalars)
    return img


def _vtk_matrix(M) -> "vtk.vtkMatrix4x4":
    m = vtk.vtkMatrix4x4()
    M = np.asarray(M, float)
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(M[r, c]))
    return m


def _numpy_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _int_attr(node, key, default, label) -> int:
    text = node.GetAttribute(key)
    if not text:
        return int(default)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{label}: attribute {key} must be an integer, got {text!r}") from None


def _stem(path: Path) -> str:
    name = path.name
    for sfx in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(sfx):
            return name[: -len(sfx)]
    return path.stem


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class _quiet_vtk:
    """Collect VTK's informational output (MRB zip chatter) instead of printing it."""

    def __enter__(self):
        self._previous = vtk.vtkOutputWindow.GetInstance()
        self._sink = vtk.vtkStringOutputWindow()
        vtk.vtkOutputWindow.SetInstance(self._sink)
        return self

    def __exit__(self, *exc):
        vtk.vtkOutputWindow.SetInstance(self._previous)
        return False
