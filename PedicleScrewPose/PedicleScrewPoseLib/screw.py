"""Parametric polyaxial pedicle screw: specification, pose, mesh and attenuation volume.

Screw frame (CASE_FORMAT.md): origin at the **entry point** (the point on the axis
where the threaded shaft meets the head), ``+z`` along the axis towards the
**tip**, millimetres. The shaft occupies ``0 <= z <= length_mm``; the tulip head
occupies ``-head_height_mm <= z < 0``. The head's U-slot (where the rod lies)
runs along the screw-frame ``x`` axis, so ``x`` is the rod direction.

The geometry is one implicit function, :func:`signed_distance` (negative
inside, approximately millimetres), built by min/max (union/intersection) of
simple primitives:

* shaft: a helical thread, radius ``r(theta, z)`` between the core and the outer
  radius following a trapezoidal thread profile whose phase is
  ``z - pitch * theta / 2 pi``; over the last ``tip_length_mm`` the radius tapers
  linearly to zero (conical tip);
* head: a tulip (cylinder with a central bore, a hole in its base and a U-slot
  with a round bottom, open at the top), a ball sitting in the tulip's base and
  a neck joining the ball to the shaft.

Both the mesh (:func:`screw_mesh`, marching cubes on that function) and the
attenuation volume (:func:`attenuation_volume`, supersampled occupancy) come
from the same function, so they agree.
"""
from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ScrewSpec",
    "Screw",
    "ScrewVolume",
    "catalogue",
    "pose_from_entry_tip",
    "signed_distance",
    "inside",
    "screw_mesh",
    "save_stl",
    "attenuation_volume",
    "shaft_volume_mm3",
    "outer_surface_points",
]

# Rod diameter the tulip is made for (mm); most thoracolumbar systems use 5.5 mm rods.
ROD_DIAMETER_MM = 5.5


# --------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ScrewSpec:
    """Dimensions of one screw, millimetres.

    ``length_mm`` is the shaft length from the entry point (z = 0) to the tip
    (z = length_mm); the head extends from ``z = -head_height_mm`` to ``z = 0``.
    Frozen and hashable: used as a cache key.
    """

    diameter_mm: float
    length_mm: float
    core_diameter_mm: float
    pitch_mm: float
    tip_length_mm: float
    head_diameter_mm: float
    head_height_mm: float
    name: str = ""

    def __post_init__(self):
        checks = {
            "diameter_mm": self.diameter_mm > 0,
            "length_mm": self.length_mm > 0,
            "core_diameter_mm": 0 < self.core_diameter_mm <= self.diameter_mm,
            "pitch_mm": self.pitch_mm > 0,
            "tip_length_mm": 0 < self.tip_length_mm < self.length_mm,
            "head_diameter_mm": self.head_diameter_mm > self.core_diameter_mm,
            "head_height_mm": self.head_height_mm > 0,
        }
        for name, ok in checks.items():
            if not ok or not np.isfinite(getattr(self, name)):
                raise ValueError(f"ScrewSpec: invalid {name}={getattr(self, name)!r} "
                                 f"(need positive sizes, core <= outer diameter, tip shorter than the shaft, "
                                 f"head wider than the core)")

    @classmethod
    def from_size(cls, diameter_mm: float, length_mm: float, name: str | None = None) -> "ScrewSpec":
        """A screw of outer ``diameter_mm`` and shaft ``length_mm`` with realistic proportions.

        Core ~72 % of the outer diameter, pitch 2.0-3.0 mm, a conical tip of about
        0.6 diameters, a tulip head 10.5-13 mm wide and about 14 mm tall (5.5 mm rod).
        """
        d = float(diameter_mm)
        L = float(length_mm)
        if not (d > 0 and L > 0 and np.isfinite(d) and np.isfinite(L)):
            raise ValueError(f"ScrewSpec.from_size: diameter_mm={diameter_mm!r} and length_mm={length_mm!r} must be positive")
        head_d = float(np.clip(d + 5.0, 10.5, 13.0))
        return cls(
            diameter_mm=d,
            length_mm=L,
            core_diameter_mm=round(0.72 * d, 3),
            pitch_mm=round(float(np.clip(0.35 * d + 0.5, 2.0, 3.0)), 3),
            tip_length_mm=round(float(np.clip(0.6 * d, 2.5, 5.0)), 3),
            head_diameter_mm=head_d,
            head_height_mm=round(0.55 * head_d + 7.5, 3),
            name=name if name is not None else f"{d:g}x{L:g}",
        )

    # Useful radii for breach checks and rendering bounds.
    @property
    def outer_radius_mm(self) -> float:
        return 0.5 * self.diameter_mm

    @property
    def core_radius_mm(self) -> float:
        return 0.5 * self.core_diameter_mm

    @property
    def head_radius_mm(self) -> float:
        return 0.5 * self.head_diameter_mm

    @property
    def total_length_mm(self) -> float:
        """Top of the head to the tip."""
        return self.length_mm + self.head_height_mm

    @property
    def bounds_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds (min xyz, max xyz) of the material in the screw frame."""
        r = max(self.head_radius_mm, self.outer_radius_mm)
        return (np.array([-r, -r, -self.head_height_mm]), np.array([r, r, self.length_mm]))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("diameter_mm", "length_mm", "core_diameter_mm", "pitch_mm",
                                              "tip_length_mm", "head_diameter_mm", "head_height_mm", "name")}


def catalogue() -> list[ScrewSpec]:
    """Common pedicle screw sizes: diameters 4.0-8.5 mm x shaft lengths 25-60 mm (5 mm steps)."""
    diameters = (4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.5)
    lengths = (25.0, 30.0, 35.0, 40.0, 45.0, 50.0, 55.0, 60.0)
    return [ScrewSpec.from_size(d, L) for d in diameters for L in lengths]


# --------------------------------------------------------------------------- pose
def pose_from_entry_tip(entry_mm, tip_mm, roll_deg: float = 0.0) -> np.ndarray:
    """Rigid 4x4 ``T_world_from_screw`` with origin at ``entry_mm`` and +z towards ``tip_mm``.

    Roll 0 puts the screw-frame ``x`` axis (the head's slot, i.e. the rod
    direction) along world superior (S) projected perpendicular to the axis
    (along world R if the axis is nearly along S); ``roll_deg`` then turns the
    frame about +z (right-handed).
    """
    entry = np.asarray(entry_mm, dtype=float).reshape(3)
    tip = np.asarray(tip_mm, dtype=float).reshape(3)
    axis = tip - entry
    n = np.linalg.norm(axis)
    if not np.isfinite(n) or n < 1e-9:
        raise ValueError(f"pose_from_entry_tip: entry {entry.tolist()} and tip {tip.tolist()} must differ and be finite")
    z = axis / n
    ref = np.array([0.0, 0.0, 1.0]) if abs(z[2]) < 0.95 else np.array([1.0, 0.0, 0.0])
    x = ref - np.dot(ref, z) * z
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    a = np.deg2rad(roll_deg)
    x, y = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, entry
    return T


@dataclass
class Screw:
    """A screw placed in the world: its spec and ``T_world_from_screw`` (4x4, RAS mm)."""

    spec: ScrewSpec
    T_world_from_screw: np.ndarray
    id: str = "S"
    level: str | None = None
    side: str | None = None  # "left" / "right": the patient's side
    breach_mm: float | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        T = np.asarray(self.T_world_from_screw, dtype=float)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"Screw {self.id}: T_world_from_screw must be a finite 4x4 matrix, got shape {T.shape}")
        R = T[:3, :3]
        if not np.allclose(R.T @ R, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
            raise ValueError(f"Screw {self.id}: T_world_from_screw rotation is not a proper rotation")
        self.T_world_from_screw = T

    @property
    def entry_mm(self) -> np.ndarray:
        return self.T_world_from_screw[:3, 3].copy()

    @property
    def axis(self) -> np.ndarray:
        return self.T_world_from_screw[:3, 2].copy()

    @property
    def tip_mm(self) -> np.ndarray:
        return self.entry_mm + self.spec.length_mm * self.axis

    def to_world(self, points_screw_mm) -> np.ndarray:
        """Screw-frame points (N,3) mm -> world RAS (N,3) mm."""
        p = np.asarray(points_screw_mm, dtype=float).reshape(-1, 3)
        return p @ self.T_world_from_screw[:3, :3].T + self.T_world_from_screw[:3, 3]

    def to_screw(self, points_world_mm) -> np.ndarray:
        """World RAS points (N,3) mm -> screw frame (N,3) mm."""
        p = np.asarray(points_world_mm, dtype=float).reshape(-1, 3)
        return (p - self.T_world_from_screw[:3, 3]) @ self.T_world_from_screw[:3, :3]

    def to_truth_dict(self) -> dict:
        """The truth.json screw entry (CASE_FORMAT.md), plus ``transform`` and the full ``spec``."""
        d = {
            "id": self.id,
            "entry_mm": [float(v) for v in self.entry_mm],
            "tip_mm": [float(v) for v in self.tip_mm],
            "diameter_mm": float(self.spec.diameter_mm),
            "length_mm": float(self.spec.length_mm),
            "level": self.level,
            "side": self.side,
            "breach_mm": None if self.breach_mm is None else float(self.breach_mm),
            "transform": [[float(v) for v in row] for row in self.T_world_from_screw],
            "spec": self.spec.to_dict(),
        }
        return d

    @classmethod
    def from_truth_dict(cls, d: dict) -> "Screw":
        """Inverse of :meth:`to_truth_dict` (uses ``transform`` when present, else entry/tip with roll 0)."""
        try:
            if "spec" in d:
                spec = ScrewSpec(**{k: d["spec"][k] for k in ScrewSpec.__dataclass_fields__ if k in d["spec"]})
            else:
                spec = ScrewSpec.from_size(d["diameter_mm"], d["length_mm"])
            if "transform" in d:
                T = np.asarray(d["transform"], dtype=float)
            else:
                T = pose_from_entry_tip(d["entry_mm"], d["tip_mm"])
        except KeyError as exc:
            raise ValueError(f"screw entry {d.get('id', '?')!r}: missing field {exc}") from None
        return cls(spec=spec, T_world_from_screw=T, id=str(d.get("id", "S")), level=d.get("level"),
                   side=d.get("side"), breach_mm=d.get("breach_mm"))


# --------------------------------------------------------------------------- implicit geometry
def _thread_profile(s):
    """Trapezoidal thread height 0..1 over one pitch (phase s in [0, 1)); continuous and periodic."""
    # rise 0..0.35, crest 0.35..0.5, fall 0.5..0.85, root 0.85..1
    return np.clip(np.minimum(s / 0.35, (0.85 - s) / 0.35), 0.0, 1.0)


def _head_layout(spec: ScrewSpec) -> dict:
    """Derived head dimensions (mm, screw frame; head is at z < 0)."""
    H = spec.head_height_mm
    Rh = spec.head_radius_mm
    Rb = min(0.5 * ROD_DIAMETER_MM + 0.15, 0.68 * Rh)       # bore / slot half-width
    gap = 0.12 * H                                          # neck visible between tulip and shaft
    base_h = 0.16 * H                                       # tulip base thickness
    z_base_top = -gap - base_h                              # bore bottom
    r_ball = 0.95 * Rb
    z_ball = z_base_top + 0.25 * r_ball                     # ball centre (sits in the base)
    r_hole = min(0.8 * r_ball, max(0.75 * spec.core_radius_mm, 0.5 * r_ball))
    r_neck = 0.8 * r_hole
    z_slot = z_ball - r_ball - 0.6 * Rb                     # centre of the slot's round bottom
    return dict(H=H, Rh=Rh, Rb=Rb, gap=gap, z_base_top=z_base_top, r_ball=r_ball, z_ball=z_ball,
                r_hole=r_hole, r_neck=r_neck, z_slot=z_slot)


def signed_distance(spec: ScrewSpec, points_screw_mm) -> np.ndarray:
    """Implicit screw function at screw-frame points (N,3) mm: < 0 inside, > 0 outside.

    Approximately a distance in mm near the surface (Lipschitz constant below ~2
    because of the thread flanks); exact enough for occupancy and contouring.
    """
    p = np.asarray(points_screw_mm, dtype=float)
    shape = p.shape[:-1]
    p = p.reshape(-1, 3)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    rho = np.hypot(x, y)
    # Each part is evaluated only near its own z range (the other part's field is
    # >= 1 mm there, so the min, and hence the sign, is unchanged); halves the cost.
    f = np.empty(len(p))
    sh = z > -1.0
    hd = z < 1.0
    f[~hd] = _shaft_field(spec, x[~hd], y[~hd], z[~hd], rho[~hd])
    f[~sh] = _head_field(spec, x[~sh], y[~sh], z[~sh], rho[~sh])
    both = sh & hd
    f[both] = np.minimum(_shaft_field(spec, x[both], y[both], z[both], rho[both]),
                         _head_field(spec, x[both], y[both], z[both], rho[both]))
    return f.reshape(shape)


def inside(spec: ScrewSpec, points_screw_mm) -> np.ndarray:
    """Boolean occupancy at screw-frame points (N,3) mm."""
    return signed_distance(spec, points_screw_mm) <= 0.0


def _shaft_field(spec, x, y, z, rho):
    R, rc, P, L, tl = spec.outer_radius_mm, spec.core_radius_mm, spec.pitch_mm, spec.length_mm, spec.tip_length_mm
    theta = np.arctan2(y, x)
    s = np.mod(z - P * theta / (2 * np.pi), P) / P
    r = rc + (R - rc) * _thread_profile(s)
    taper = np.clip((L - z) / tl, 0.0, 1.0)
    f = rho - r * taper
    return np.maximum(f, np.maximum(-z, z - L))


def _head_field(spec, x, y, z, rho):
    h = _head_layout(spec)
    # Tulip: cylinder z in [-H, -gap] ...
    f = np.maximum(rho - h["Rh"], np.maximum(-(z + h["H"]), z + h["gap"]))
    # ... minus the bore (open at the top, down to the base), the hole in the base ...
    bore = np.maximum(rho - h["Rb"], z - h["z_base_top"])
    f = np.maximum(f, -bore)
    f = np.maximum(f, -(rho - h["r_hole"]))
    # ... minus the U-slot along x with a round bottom.
    ay = np.abs(y)
    slot = np.minimum(np.maximum(ay - h["Rb"], z - h["z_slot"]), np.hypot(y, z - h["z_slot"]) - h["Rb"])
    f = np.maximum(f, -slot)
    # Ball in the base, neck from the ball into the shaft (slightly past z=0 so the union is solid).
    ball = np.sqrt(rho**2 + (z - h["z_ball"]) ** 2) - h["r_ball"]
    neck = np.maximum(rho - h["r_neck"], np.maximum(h["z_ball"] - z, z - 0.5))
    return np.minimum(f, np.minimum(ball, neck))


def shaft_volume_mm3(spec: ScrewSpec) -> float:
    """Analytic volume of the shaft (z >= 0), mm^3.

    At any z the thread phase runs over a full period as theta goes round, so
    the cross-section area is pi <r^2> (mean over the profile); the tip scales
    r by (L - z)/tip_length, integrating to a third of the cylinder.
    """
    s = (np.arange(20000) + 0.5) / 20000
    r = spec.core_radius_mm + (spec.outer_radius_mm - spec.core_radius_mm) * _thread_profile(s)
    area = np.pi * np.mean(r**2)
    return float(area * (spec.length_mm - spec.tip_length_mm) + area * spec.tip_length_mm / 3.0)


# --------------------------------------------------------------------------- mesh
def screw_mesh(spec: ScrewSpec, voxel_mm: float = 0.2):
    """Closed triangle mesh of the screw (``vtkPolyData``, screw frame, mm) with normals.

    Marching cubes (vtkFlyingEdges3D) on :func:`signed_distance` sampled on a
    grid padded beyond the screw, so the surface is closed (no boundary edges).
    Returns a new copy each call (the contour is cached per spec).
    """
    import vtk

    out = vtk.vtkPolyData()
    out.DeepCopy(_screw_mesh_cached(spec, float(voxel_mm)))
    return out


@functools.lru_cache(maxsize=16)
def _screw_mesh_cached(spec: ScrewSpec, voxel_mm: float):
    import vtk
    from vtk.util import numpy_support

    lo, hi = spec.bounds_mm
    lo = lo - 2 * voxel_mm
    hi = hi + 2 * voxel_mm
    n = np.ceil((hi - lo) / voxel_mm).astype(int) + 1
    xs = [lo[i] + voxel_mm * np.arange(n[i]) for i in range(3)]
    zz, yy, xx = np.meshgrid(xs[2], xs[1], xs[0], indexing="ij")
    f = signed_distance(spec, np.stack([xx, yy, zz], axis=-1)).astype(np.float32)
    img = vtk.vtkImageData()
    img.SetDimensions(int(n[0]), int(n[1]), int(n[2]))
    img.SetSpacing(voxel_mm, voxel_mm, voxel_mm)
    img.SetOrigin(*lo)
    arr = numpy_support.numpy_to_vtk(f.ravel(), deep=True, array_type=vtk.VTK_FLOAT)
    arr.SetName("f")
    img.GetPointData().SetScalars(arr)
    mc = vtk.vtkFlyingEdges3D()
    mc.SetInputData(img)
    mc.SetValue(0, 0.0)
    mc.ComputeNormalsOff()
    mc.ComputeGradientsOff()
    mc.ComputeScalarsOff()
    # Merge coincident points; drop (rather than convert to lines) triangles that
    # collapse, so the output holds triangles only.
    clean = vtk.vtkCleanPolyData()
    clean.SetInputConnection(mc.GetOutputPort())
    clean.ConvertPolysToLinesOff()
    clean.ConvertLinesToPointsOff()
    clean.PointMergingOn()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(clean.GetOutputPort())
    normals.SplittingOff()
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.Update()
    mesh = vtk.vtkPolyData()
    mesh.DeepCopy(normals.GetOutput())
    return mesh


def save_stl(spec: ScrewSpec, path, voxel_mm: float = 0.2) -> str:
    """Write the screw mesh (screw frame, mm) as a binary STL, atomically. Returns the path."""
    import vtk

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save_stl: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(suffix=".stl", dir=folder)
    os.close(fd)
    try:
        w = vtk.vtkSTLWriter()
        w.SetFileName(tmp)
        w.SetInputData(screw_mesh(spec, voxel_mm))
        w.SetFileTypeToBinary()
        if not w.Write():
            raise ValueError(f"save_stl: could not write {path}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --------------------------------------------------------------------------- attenuation volume
@dataclass(frozen=True)
class ScrewVolume:
    """Titanium fraction per voxel (0..1, float32, read-only), screw frame.

    ``head`` and ``shaft`` are ``[z, y, x]`` arrays on the same grid: head is the
    material with screw-frame z < 0, shaft with z >= 0. ``origin_mm`` is the
    screw-frame (x, y, z) of voxel [0, 0, 0]'s centre; voxels are cubes of
    ``voxel_mm``: voxel [k, j, i] is centred at ``origin_mm + voxel_mm * (i, j, k)``.
    """

    head: np.ndarray
    shaft: np.ndarray
    origin_mm: np.ndarray
    voxel_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.head.shape

    @property
    def total(self) -> np.ndarray:
        return self.head + self.shaft

    def volume_mm3(self) -> tuple[float, float]:
        """(head, shaft) titanium volume in mm^3."""
        v = self.voxel_mm**3
        return float(self.head.sum(dtype=np.float64) * v), float(self.shaft.sum(dtype=np.float64) * v)


def attenuation_volume(spec: ScrewSpec, voxel_mm: float = 0.25, supersample: int = 3) -> ScrewVolume:
    """Per-voxel titanium fraction of the screw (partial volume), split head / shaft. Cached per spec.

    The voxel grid is aligned so that z = 0 (entry) falls on a voxel face, so
    each voxel is wholly head or wholly shaft. Voxels far from the surface
    (|f| beyond what the function's slope allows) are 0 or 1 directly; the others
    are supersampled ``supersample``^3 times.
    """
    if not (voxel_mm > 0 and np.isfinite(voxel_mm)):
        raise ValueError(f"attenuation_volume: voxel_mm={voxel_mm!r} must be positive")
    return _attenuation_volume_cached(spec, float(voxel_mm), int(supersample))


@functools.lru_cache(maxsize=32)  # up to ~7 MB each
def _attenuation_volume_cached(spec: ScrewSpec, h: float, ss: int) -> ScrewVolume:
    lo, hi = spec.bounds_mm
    r_max = hi[0]
    nxy = int(np.ceil(r_max / h)) + 1                     # voxels each side of the axis
    # x,y centres symmetric about the axis; z faces on multiples of h so z=0 is a face.
    cx = (np.arange(-nxy, nxy) + 0.5) * h
    kz0 = int(np.floor(lo[2] / h)) - 1
    kz1 = int(np.ceil(hi[2] / h)) + 1
    cz = (np.arange(kz0, kz1) + 0.5) * h
    zz, yy, xx = np.meshgrid(cz, cx, cx, indexing="ij")
    centres = np.stack([xx, yy, zz], axis=-1).reshape(-1, 3)
    f = signed_distance(spec, centres)
    frac = (f <= 0).astype(np.float32)
    # Lipschitz bound ~2 on the field: a voxel is uniform when |f| > 2 * half-diagonal.
    margin = 2.0 * 0.5 * np.sqrt(3.0) * h
    edge = np.nonzero(np.abs(f) <= margin)[0]
    offs = ((np.arange(ss) + 0.5) / ss - 0.5) * h
    oz, oy, ox = np.meshgrid(offs, offs, offs, indexing="ij")
    sub = np.stack([ox, oy, oz], axis=-1).reshape(-1, 3)
    chunk = max(1, 2_000_000 // len(sub))
    for a in range(0, len(edge), chunk):
        idx = edge[a:a + chunk]
        pts = centres[idx, None, :] + sub[None, :, :]
        frac[idx] = inside(spec, pts.reshape(-1, 3)).reshape(len(idx), -1).mean(axis=1)
    frac = frac.reshape(zz.shape)
    is_head = (cz < 0)[:, None, None]
    head = np.where(is_head, frac, 0).astype(np.float32)
    shaft = np.where(is_head, 0, frac).astype(np.float32)
    head.setflags(write=False)
    shaft.setflags(write=False)
    origin = np.array([cx[0], cx[0], cz[0]])
    origin.setflags(write=False)
    return ScrewVolume(head=head, shaft=shaft, origin_mm=origin, voxel_mm=h)


# --------------------------------------------------------------------------- surface samples
def outer_surface_points(spec: ScrewSpec, n_axial: int | None = None, n_around: int = 24,
                         include_tip: bool = True) -> np.ndarray:
    """Points (N,3) on the shaft's outer envelope (thread crests), screw frame mm.

    The envelope is the cylinder of the outer radius, tapering over the tip to the
    tip point; used for breach checks (how far the threads reach out of bone).
    """
    L, tl, R = spec.length_mm, spec.tip_length_mm, spec.outer_radius_mm
    if n_axial is None:
        n_axial = max(8, int(np.ceil(L / 1.0)) + 1)
    z = np.linspace(0.0, L if include_tip else L - tl, n_axial)
    r = R * np.clip((L - z) / tl, 0.0, 1.0)
    a = np.linspace(0, 2 * np.pi, n_around, endpoint=False)
    pts = np.stack([r[:, None] * np.cos(a)[None, :], r[:, None] * np.sin(a)[None, :],
                    np.broadcast_to(z[:, None], (len(z), len(a)))], axis=-1)
    return pts.reshape(-1, 3)
