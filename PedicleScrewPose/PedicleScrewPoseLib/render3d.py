"""Offscreen 3D picture of the result: the vertebrae (bone surface) and the screws in world RAS.

Plain VTK rendered offscreen (``SetOffScreenRendering(1)``; without an X
display VTK draws through EGL, so no window or GPU is needed).  The bone
surface is marching cubes of the vertebra label map (each vertebra its own
surface) or, without labels, of the CT at ``bone_hu``, cropped around the
screws.  The screws are the parametric screw meshes (``screw.screw_mesh``)
placed by their ``T_world_from_screw``.  Where VTK cannot render at all, a
simpler matplotlib picture (bone points, screw axes) is drawn instead and
:func:`render_scene_png` says so in its return value.

Used for the README picture, the report and the demo: no Slicer needed.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RenderedPicture", "render_scene_png", "render_result_png", "screws_from_result", "grade_legend",
           "CAMERAS"]

#: Camera presets: direction from the focus to the camera (RAS) and the view-up direction.
CAMERAS = {
    "posterior-oblique": ((-0.55, -1.0, 0.45), (0.0, 0.0, 1.0)),
    "posterior": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
    "lateral": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "anterior-oblique": ((0.5, 1.0, 0.3), (0.0, 0.0, 1.0)),
    "axial": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
}
BONE_COLORS = ((0.93, 0.87, 0.74), (0.85, 0.78, 0.64))  # alternate between neighbouring vertebrae
GRADE_COLORS = {"A": (0.25, 0.8, 0.3), "B": (0.75, 0.85, 0.2), "C": (1.0, 0.6, 0.1),
                "D": (0.95, 0.25, 0.15), "E": (0.8, 0.1, 0.4)}
DEFAULT_SCREW_COLOR = (0.55, 0.7, 0.95)
#: Translucent bone, so the shafts inside the pedicles show.
BONE_OPACITY = 0.55
_VERTEBRA = re.compile(r"^(C|T|L|S)\d{1,2}$|^vertebrae?_", re.IGNORECASE)


@dataclass
class RenderedPicture:
    """Where the picture went and how it was drawn (``"vtk"`` or ``"matplotlib"``)."""

    path: Path
    renderer: str
    n_screws: int
    bone_triangles: int


def render_scene_png(path, ct=None, labels=None, screws=(), size=(800, 600), camera="posterior-oblique",
                     bone_hu: float = 200.0, margin_mm: float = 35.0, background=(1.0, 1.0, 1.0),
                     title: str | None = None, legend: dict | None = None) -> RenderedPicture:
    """Draw the bone surface and the screws into a PNG, atomically.

    ``ct``: ``ct.Volume`` (HU) or None; ``labels``: ``ct.LabelVolume`` or None
    (preferred for the bone: only vertebrae, by name "T12", "L1", ...);
    ``screws``: items ``(spec, T_world_from_screw, rgb)`` or
    ``(spec, T, rgb, text)``, ``spec`` a ``ScrewSpec`` or ``(diameter_mm,
    length_mm)``, ``T`` (4,4) screw frame → world RAS mm, ``rgb`` in 0..1, or
    dicts from :func:`screws_from_result`.  The bone is cropped to the screws'
    bounding box plus ``margin_mm`` (the whole volume when there are no
    screws).  ``camera``: one of :data:`CAMERAS`, or a list of them for panels
    side by side (``size`` is per panel).  ``legend``: text -> rgb, drawn
    bottom left (e.g. the breach grades shown).
    """
    path = Path(path)
    cameras = [camera] if isinstance(camera, str) else list(camera)
    for cam in cameras:
        if cam not in CAMERAS:
            raise ValueError(f"camera {cam!r}: expected one of {sorted(CAMERAS)}")
    if not cameras:
        raise ValueError("camera: give at least one")
    width, height = (int(x) for x in size)
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise ValueError(f"size {size}: width and height must be 16..8192 px")
    items = [_screw_item(s, i) for i, s in enumerate(screws)]
    roi = _roi(items, margin_mm)
    bone = _bone_surface(ct, labels, roi, bone_hu)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    panels = []
    try:
        renderer = "vtk"
        for k, cam in enumerate(cameras):
            panel = tmp if len(cameras) == 1 else f"{tmp}.{k}.png"
            panels.append(panel)
            # The title goes on the first panel, the legend on the last.
            panel_title = title if k == 0 else None
            panel_legend = legend if k == len(cameras) - 1 else None
            try:
                if renderer != "vtk":
                    raise RuntimeError("VTK already failed")
                _render_vtk(panel, bone, items, (width, height), cam, background, panel_title, panel_legend)
            except RuntimeError:
                _render_matplotlib(panel, bone, items, (width, height), cam, panel_title)
                renderer = "matplotlib"
        if len(panels) > 1:
            _side_by_side(panels, tmp)
        _chmod_like_new_file(tmp)
        os.replace(tmp, path)
    finally:
        for f in [tmp] + panels:
            if os.path.exists(f):
                os.unlink(f)
    return RenderedPicture(path=path, renderer=renderer, n_screws=len(items),
                           bone_triangles=0 if bone is None else int(bone.GetNumberOfCells()))


def _chmod_like_new_file(path) -> None:
    """mkstemp makes 0600 files; give the final file the mode a plain open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _side_by_side(pngs, out):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in pngs]
    w = sum(im.width for im in images)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width
    sheet.save(out, format="PNG")


def screws_from_result(result: dict) -> list:
    """Screw items for :func:`render_scene_png` from a ``result.json`` dict, coloured by breach grade."""
    items = []
    for s in result.get("screws", []):
        grade = (s.get("breach") or {}).get("grade") if isinstance(s.get("breach"), dict) else None
        text = f"{s['level']} {s['side'][0].upper()}" if s.get("level") and s.get("side") else str(s.get("id", ""))
        items.append({"diameter_mm": float(s["diameter_mm"]), "length_mm": float(s["length_mm"]),
                      "T_world_from_screw": np.asarray(s["transform"], float),
                      "color": GRADE_COLORS.get(grade, DEFAULT_SCREW_COLOR), "text": text})
    return items


def grade_legend(result: dict) -> dict:
    """Legend entries (text -> rgb) for the breach grades present in a result."""
    grades = sorted({(s.get("breach") or {}).get("grade") for s in result.get("screws", [])
                     if isinstance(s.get("breach"), dict)} - {None})
    return {f"grade {g}": GRADE_COLORS[g] for g in grades if g in GRADE_COLORS}


def render_result_png(path, case, result: dict, **kwargs) -> RenderedPicture:
    """:func:`render_scene_png` for a case (its CT and labels, when it has them) and its result.

    Screws are coloured by breach grade (legend included) and labelled by level and side.
    """
    from . import ct as ctmod

    kwargs.setdefault("legend", grade_legend(result) or None)

    ct = ctmod.load_volume(case.ct_path) if getattr(case, "ct_path", None) else None
    labels = None
    if getattr(case, "labels_path", None):
        labels = ctmod.load_labels(case.labels_path, names=getattr(case, "label_names", None) or None)
    return render_scene_png(path, ct=ct, labels=labels, screws=screws_from_result(result), **kwargs)


# ----------------------------------------------------------------------------- screws
def _screw_item(s, i) -> dict:
    from . import screw as screwmod

    if isinstance(s, dict):
        spec = s.get("spec") or screwmod.ScrewSpec.from_size(float(s["diameter_mm"]), float(s["length_mm"]))
        T = s.get("T_world_from_screw", s.get("transform"))
        color, text = s.get("color", DEFAULT_SCREW_COLOR), s.get("text")
    else:
        if len(s) not in (3, 4):
            raise ValueError(f"screws[{i}]: expected (spec, T_world_from_screw, rgb[, text]), got {len(s)} items")
        spec, T, color = s[0], s[1], s[2]
        text = s[3] if len(s) == 4 else None
        if not isinstance(spec, screwmod.ScrewSpec):
            d, length = spec
            spec = screwmod.ScrewSpec.from_size(float(d), float(length))
    T = np.asarray(T, float)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ValueError(f"screws[{i}]: T_world_from_screw must be a finite 4x4 matrix")
    color = tuple(float(c) for c in color)
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise ValueError(f"screws[{i}]: colour must be 3 numbers in 0..1, got {color}")
    return {"spec": spec, "T": T, "color": color, "text": text}


def _screw_points(item) -> np.ndarray:
    spec, T = item["spec"], item["T"]
    local = np.array([[0, 0, -spec.head_height_mm], [0, 0, spec.length_mm]], float)
    return local @ T[:3, :3].T + T[:3, 3]


def _roi(items, margin_mm):
    if not items:
        return None
    pts = np.vstack([_screw_points(it) for it in items])
    return pts.min(axis=0) - margin_mm, pts.max(axis=0) + margin_mm


# ----------------------------------------------------------------------------- bone
def _bone_surface(ct, labels, roi, bone_hu):
    """Bone surface polydata in RAS mm (with a "vertebra" cell scalar for colouring), or None."""
    if labels is not None:
        values = _vertebra_values(labels)
        if values:
            return _label_surface(labels, values, roi)
    if ct is not None:
        return _ct_surface(ct, roi, bone_hu)
    return None


def _vertebra_values(labels) -> list:
    names = getattr(labels, "names", None) or {}
    present = set(np.unique(labels.array).tolist()) - {0}
    if names:
        return sorted(int(v) for v, n in names.items() if int(v) in present and _VERTEBRA.match(str(n)))
    return sorted(int(v) for v in present)


def _crop(volume, roi):
    """(array [k,j,i] cropped, ijk_to_ras of the crop)."""
    arr = np.asarray(volume.array)
    M = np.asarray(volume.ijk_to_ras, float)
    if roi is None:
        return arr, M
    lo, hi = roi
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (np.linalg.inv(M) @ np.c_[corners, np.ones(8)].T)[:3].T
    start = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, None)
    shape_ijk = np.array(arr.shape[::-1])
    stop = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, shape_ijk)
    if np.any(stop - start < 2):
        return arr[:0, :0, :0], M
    sub = arr[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]]
    M2 = M.copy()
    M2[:3, 3] = M[:3, :3] @ start + M[:3, 3]
    return sub, M2


def _image(arr, vtk_type=None):
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(arr)
    img = vtk.vtkImageData()
    img.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel(), deep=True, array_type=vtk_type))
    return img


def _to_world(poly, M):
    """Points from continuous IJK to RAS; triangles re-wound when the grid is mirrored."""
    import vtk

    t = vtk.vtkTransform()
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(M[r, c]))
    t.SetMatrix(m)
    f = vtk.vtkTransformPolyDataFilter()
    f.SetInputData(poly)
    f.SetTransform(t)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(f.GetOutputPort())
    normals.SplittingOff()
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()  # closed surfaces: normals point out whatever the grid's handedness
    normals.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(normals.GetOutput())
    return out


def _label_surface(labels, values, roi):
    import vtk

    arr, M = _crop(labels, roi)
    if arr.size == 0:
        return None
    keep = np.isin(arr, values)
    if not keep.any():
        return None
    arr = np.where(keep, arr, 0).astype(np.int16)
    arr = np.pad(arr, 1)  # closed surfaces at the crop's faces
    M = M.copy()
    M[:3, 3] -= M[:3, :3] @ np.ones(3)
    fe = vtk.vtkDiscreteFlyingEdges3D()
    fe.SetInputData(_image(arr))
    for n, v in enumerate(values):
        fe.SetValue(n, float(v))
    fe.ComputeScalarsOn()
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(fe.GetOutputPort())
    smooth.SetNumberOfIterations(30)
    smooth.SetPassBand(0.03)
    smooth.NonManifoldSmoothingOn()
    smooth.NormalizeCoordinatesOn()
    smooth.Update()
    poly = smooth.GetOutput()
    if poly.GetNumberOfCells() == 0:
        return None
    out = _to_world(poly, M)
    _set_vertebra_scalars(out, values)
    return out


def _set_vertebra_scalars(poly, values):
    """Cell scalar 0/1 alternating between neighbouring label values (colouring only)."""
    import vtk
    from vtk.util import numpy_support

    scal = poly.GetCellData().GetScalars() or poly.GetPointData().GetScalars()
    if scal is None:
        return
    v = numpy_support.vtk_to_numpy(scal).astype(int)
    if v.ndim > 1:
        v = v[:, 0]
    rank = {val: i for i, val in enumerate(sorted(values))}
    alt = np.array([rank.get(int(x), 0) % 2 for x in v], dtype=np.uint8)
    arr = numpy_support.numpy_to_vtk(alt, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    arr.SetName("vertebra")
    if poly.GetCellData().GetScalars() is not None and scal is poly.GetCellData().GetScalars():
        poly.GetCellData().SetScalars(arr)
    else:
        poly.GetPointData().SetScalars(arr)


def _ct_surface(ct, roi, bone_hu):
    import vtk

    arr, M = _crop(ct, roi)
    if arr.size == 0:
        return None
    # Large crops are subsampled in-plane to keep marching cubes to about a second.
    step = 2 if arr.size > 12_000_000 else 1
    if step > 1:
        arr = arr[:, ::step, ::step]
        M = M.copy()
        M[:3, 0] *= step
        M[:3, 1] *= step
    arr = np.pad(arr.astype(np.float32), 1, constant_values=float(np.min(arr)) if arr.size else -1000.0)
    M = M.copy()
    M[:3, 3] -= M[:3, :3] @ np.ones(3)
    smooth = vtk.vtkImageGaussianSmooth()
    smooth.SetInputData(_image(arr))
    smooth.SetStandardDeviations(0.8, 0.8, 0.5)
    fe = vtk.vtkFlyingEdges3D()
    fe.SetInputConnection(smooth.GetOutputPort())
    fe.SetValue(0, float(bone_hu))
    fe.ComputeNormalsOff()
    conn = vtk.vtkPolyDataConnectivityFilter()  # drop specks: keep pieces of some size
    conn.SetInputConnection(fe.GetOutputPort())
    conn.SetExtractionModeToLargestRegion()
    conn.Update()
    poly = conn.GetOutput()
    if poly.GetNumberOfCells() == 0:
        return None
    return _to_world(poly, M)


# ----------------------------------------------------------------------------- drawing
def _prefer_egl():
    # Without an X display VTK tries X first, warns, then falls back; ask for EGL directly.
    if os.name == "posix" and not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def _render_vtk(out_png, bone, items, size, camera, background, title, legend=None):
    """Raises RuntimeError when VTK cannot render (no OpenGL context) or draws nothing."""
    _prefer_egl()
    import vtk
    from vtk.util import numpy_support

    from . import screw as screwmod

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    # Depth peeling draws the translucent bone correctly over the screws inside it.
    window.SetMultiSamples(0)
    window.SetAlphaBitPlanes(1)
    renderer = vtk.vtkRenderer()
    renderer.SetUseDepthPeeling(1)
    renderer.SetMaximumNumberOfPeels(8)
    renderer.SetBackground(*background)
    window.AddRenderer(renderer)
    if bone is not None:
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(bone)
        lut = vtk.vtkLookupTable()
        lut.SetNumberOfTableValues(2)
        for i, c in enumerate(BONE_COLORS):
            lut.SetTableValue(i, *c, 1.0)
        lut.Build()
        mapper.SetLookupTable(lut)
        mapper.SetColorModeToMapScalars()  # uchar scalars would otherwise be taken as colours
        mapper.SetScalarRange(0, 1)
        has_alt = (bone.GetCellData().GetArray("vertebra") is not None
                   or bone.GetPointData().GetArray("vertebra") is not None)
        mapper.SetScalarVisibility(has_alt)
        if bone.GetCellData().GetArray("vertebra") is not None:
            mapper.SetScalarModeToUseCellData()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*BONE_COLORS[0])
        prop.SetSpecular(0.1)
        prop.SetOpacity(BONE_OPACITY)
        renderer.AddActor(actor)
    meshes = {}
    for it in items:
        spec = it["spec"]
        if spec not in meshes:
            meshes[spec] = screwmod.screw_mesh(spec, voxel_mm=0.3)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(meshes[spec])
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(it["T"][r, c]))
        actor.SetUserMatrix(m)
        prop = actor.GetProperty()
        prop.SetColor(*it["color"])
        prop.SetSpecular(0.6)
        prop.SetSpecularPower(30)
        renderer.AddActor(actor)
        if it["text"]:
            # The label sits beyond the head, on a light box, so it reads over bone and metal.
            head = _screw_points(it)[0] - 6.0 * it["T"][:3, 2]
            label = vtk.vtkBillboardTextActor3D()
            label.SetInput(str(it["text"]))
            label.SetPosition(*head)
            tp = label.GetTextProperty()
            tp.SetFontSize(max(12, size[1] // 42))
            tp.SetColor(0.1, 0.1, 0.1)
            tp.BoldOn()
            tp.SetBackgroundColor(1.0, 1.0, 1.0)
            tp.SetBackgroundOpacity(0.75)
            tp.SetJustificationToCentered()
            tp.SetVerticalJustificationToCentered()
            label.ForceOpaqueOn()
            renderer.AddActor(label)
    if title:
        text = vtk.vtkTextActor()
        text.SetInput(title)
        text.GetTextProperty().SetFontSize(max(12, size[1] // 35))
        text.GetTextProperty().SetColor(0.1, 0.1, 0.1)
        text.SetPosition(10, size[1] - max(12, size[1] // 35) - 12)
        renderer.AddViewProp(text)
    font = max(12, size[1] // 40)
    for k, (text, rgb) in enumerate((legend or {}).items()):
        entry = vtk.vtkTextActor()
        entry.SetInput(str(text))
        entry.GetTextProperty().SetFontSize(font)
        entry.GetTextProperty().SetColor(*[float(c) for c in rgb])
        entry.GetTextProperty().BoldOn()
        entry.SetPosition(10, 10 + k * (font + 6))
        renderer.AddViewProp(entry)
    vtk.vtkLightKit().AddLightsToRenderer(renderer)
    _place_camera(renderer, items, bone, camera)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    pixels = numpy_support.vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars())
    if pixels is None or pixels.size == 0 or (bone is not None or items) and np.ptp(pixels) == 0:
        window.Finalize()
        raise RuntimeError("VTK rendered an empty picture (no OpenGL context?)")
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(out_png))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    window.Finalize()


def _place_camera(renderer, items, bone, camera):
    direction, up = (np.asarray(x, float) for x in CAMERAS[camera])
    direction /= np.linalg.norm(direction)
    if items:
        focus = np.vstack([_screw_points(it) for it in items]).mean(axis=0)
    elif bone is not None:
        b = bone.GetBounds()
        focus = np.array([(b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2])
    else:
        focus = np.zeros(3)
    cam = renderer.GetActiveCamera()
    cam.SetFocalPoint(*focus)
    cam.SetPosition(*(focus + 500.0 * direction))
    cam.SetViewUp(*up)
    cam.SetViewAngle(25)
    renderer.ResetCamera()
    cam.Zoom(1.25)
    renderer.ResetCameraClippingRange()


def _render_matplotlib(out_png, bone, items, size, camera, title):
    """Fallback without OpenGL: bone surface points and screw axes in a matplotlib 3D plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vtk.util import numpy_support

    dpi = 100
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    if bone is not None and bone.GetNumberOfPoints():
        pts = numpy_support.vtk_to_numpy(bone.GetPoints().GetData())
        pts = pts[:: max(1, len(pts) // 20000)]
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=0.3, c=[BONE_COLORS[1]], alpha=0.4)
    for it in items:
        a, b = _screw_points(it)
        ax.plot(*np.c_[a, b], color=it["color"], linewidth=4)
        if it["text"]:
            ax.text(*a, it["text"], fontsize=8)
    direction = np.asarray(CAMERAS[camera][0], float)
    ax.view_init(elev=float(np.degrees(np.arcsin(direction[2] / np.linalg.norm(direction)))),
                 azim=float(np.degrees(np.arctan2(direction[1], direction[0]))))
    ax.set_xlabel("R (mm)")
    ax.set_ylabel("A (mm)")
    ax.set_zlabel("S (mm)")
    if title:
        ax.set_title(title)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
