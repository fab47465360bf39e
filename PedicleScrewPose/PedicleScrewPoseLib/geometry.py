"""C-arm view geometry: pinhole projection of world RAS millimetres onto detector pixels.

Conventions (see CASE_FORMAT.md):

* World frame: RAS, millimetres.
* Pixels: ``u`` = column, ``v`` = row, 0-based, pixel centres at integers.
* ``P`` (3x4) maps homogeneous RAS points to homogeneous pixels,
  ``[u*w, v*w, w] = P @ [x, y, z, 1]`` with ``w > 0`` between source and detector.
* ``P = K @ [R | t]``: ``R`` maps world directions to the camera frame (x along
  ``u``, y along ``v``, z from the X-ray source towards the detector), ``t`` is
  the world origin in camera coordinates, ``K`` is upper triangular with
  ``K[2, 2] = 1`` and focal lengths in pixels (source-to-detector distance over
  pixel pitch).  A mirrored detector read-out shows up as ``K[0, 0] < 0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

__all__ = [
    "View",
    "decompose_projection",
    "compose_projection",
    "project",
    "backproject",
    "source_position",
    "fundamental_matrix",
    "epipolar_line",
    "triangulate_points",
    "triangulate_line",
    "line_through_points_2d",
    "point_line_distance_2d",
    "carm_view",
    "ap_view",
    "lateral_view",
    "rotation_matrix",
]


@dataclass(frozen=True)
class View:
    """One calibrated X-ray view.

    ``K`` intrinsics (pixels), ``R`` world-to-camera rotation, ``t`` (mm): the
    world origin in camera coordinates; ``width``/``height`` in pixels.
    """

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    width: int
    height: int
    name: str = "view"
    metal: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def P(self) -> np.ndarray:
        return compose_projection(self.K, self.R, self.t)

    @property
    def source_mm(self) -> np.ndarray:
        """X-ray source position in world RAS (mm)."""
        return -self.R.T @ self.t

    @property
    def axis(self) -> np.ndarray:
        """Unit direction from the source towards the detector, world RAS."""
        return self.R[2].copy()

    @property
    def pixel_to_mm_at(self):
        """Return a function giving the magnified pixel size (mm) at a world point."""

        def f(point_mm):
            depth = float(self.R[2] @ np.asarray(point_mm, float) + self.t[2])
            return depth / abs(self.K[0, 0])

        return f

    @classmethod
    def from_P(cls, P, width: int, height: int, name: str = "view", metal=None) -> "View":
        K, R, t = decompose_projection(P)
        return cls(K=K, R=R, t=t, width=int(width), height=int(height), name=name, metal=metal)

    def project(self, points_mm) -> np.ndarray:
        return project(self.P, points_mm)

    def backproject(self, uv):
        return backproject(self.P, uv)


def compose_projection(K, R, t) -> np.ndarray:
    """``P = K [R | t]`` (3x4)."""
    K = np.asarray(K, float)
    Rt = np.hstack([np.asarray(R, float), np.asarray(t, float).reshape(3, 1)])
    return K @ Rt


def decompose_projection(P):
    """Split a 3x4 ``P`` into ``K`` (``K[2,2]=1``, ``K[1,1]>0``), rotation ``R`` (det +1) and ``t``.

    ``P`` may carry any positive scale.  Raises ``ValueError`` when ``P`` is not
    3x4, not finite, or its left 3x3 block is singular (no finite source).
    """
    P = np.asarray(P, float)
    if P.shape != (3, 4):
        raise ValueError(f"projection matrix must be 3x4, got shape {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError("projection matrix contains NaN or infinite values")
    M = P[:, :3]
    scale = np.linalg.norm(P[2, :3])
    if scale == 0 or abs(np.linalg.det(M)) < 1e-12 * max(1.0, np.abs(M).max()) ** 3:
        raise ValueError("projection matrix is singular: its left 3x3 block has no inverse")
    K, R = scipy.linalg.rq(M)
    # Make the diagonal of K positive where we can; the sign left over goes into K[0,0]
    # (a mirrored read-out) so that R stays a proper rotation.
    S = np.diag(np.sign(np.diag(K)))
    K, R = K @ S, S @ R
    if np.linalg.det(R) < 0:
        F = np.diag([-1.0, 1.0, 1.0])
        K, R = K @ F, F @ R
    # K[2,2] > 0 here, so P[2] = K[2,2] * [R[2] | t[2]]: points with w > 0 are in front of the source.
    t = np.linalg.solve(K, P[:, 3])
    s = K[2, 2]
    K = K / s
    return K, R, t


def project(P, points_mm):
    """Project world points (N,3) to pixels (N,2). Also usable with a single (3,) point."""
    P = np.asarray(P, float)
    X = np.asarray(points_mm, float)
    single = X.ndim == 1
    X = np.atleast_2d(X)
    h = X @ P[:, :3].T + P[:, 3]
    uv = h[:, :2] / h[:, 2:3]
    return uv[0] if single else uv


def depth(P, points_mm):
    """``w`` of world points: positive in front of the source (scale of ``P``)."""
    P = np.asarray(P, float)
    X = np.atleast_2d(np.asarray(points_mm, float))
    return X @ P[2, :3] + P[2, 3]


def source_position(P) -> np.ndarray:
    """X-ray source (camera centre) in world RAS mm: the right null vector of ``P``."""
    P = np.asarray(P, float)
    return -np.linalg.solve(P[:, :3], P[:, 3])


def backproject(P, uv):
    """Rays through pixels: returns ``(source (3,), unit directions (N,3))`` pointing at the detector."""
    P = np.asarray(P, float)
    uv = np.asarray(uv, float)
    single = uv.ndim == 1
    uv = np.atleast_2d(uv)
    h = np.hstack([uv, np.ones((len(uv), 1))])
    d = np.linalg.solve(P[:, :3], h.T).T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return source_position(P), (d[0] if single else d)


def _skew(v):
    return np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], float)


def fundamental_matrix(P1, P2) -> np.ndarray:
    """``F`` with ``x2^T F x1 = 0``; ``F @ x1`` is the epipolar line in view 2."""
    P1 = np.asarray(P1, float)
    P2 = np.asarray(P2, float)
    C1 = np.append(source_position(P1), 1.0)
    e2 = P2 @ C1
    F = _skew(e2) @ P2 @ np.linalg.pinv(P1)
    return F / np.linalg.norm(F)


def epipolar_line(P1, P2, uv1) -> np.ndarray:
    """Epipolar lines in view 2 of pixels in view 1, as ``(a, b, c)`` with ``a^2+b^2=1``."""
    uv1 = np.atleast_2d(np.asarray(uv1, float))
    F = fundamental_matrix(P1, P2)
    lines = (F @ np.hstack([uv1, np.ones((len(uv1), 1))]).T).T
    return lines / np.linalg.norm(lines[:, :2], axis=1, keepdims=True)


def line_through_points_2d(p, q) -> np.ndarray:
    """Homogeneous 2D line through two pixels, normalised so ``a^2+b^2=1``."""
    l = np.cross(np.append(np.asarray(p, float), 1.0), np.append(np.asarray(q, float), 1.0))
    n = np.linalg.norm(l[:2])
    if n == 0:
        raise ValueError("cannot make a line through two identical points")
    return l / n


def point_line_distance_2d(line, uv) -> np.ndarray:
    """Signed distances (pixels) of points (N,2) from a normalised homogeneous line."""
    uv = np.atleast_2d(np.asarray(uv, float))
    line = np.asarray(line, float)
    return uv @ line[:2] + line[2]


def point_segment_distance(points, a, b) -> np.ndarray:
    """Distances of points (N,D) from the segment a-b (any dimension, same units as the inputs)."""
    pts = np.atleast_2d(np.asarray(points, float))
    a = np.asarray(a, float)
    seg = np.asarray(b, float) - a
    t = np.clip((pts - a) @ seg / max(float(seg @ seg), 1e-9), 0.0, 1.0)
    return np.linalg.norm(pts - a - t[:, None] * seg, axis=1)


def triangulate_points(Ps, uvs, weights=None) -> np.ndarray:
    """Linear (DLT) triangulation of one world point from N >= 2 views.

    ``Ps``: N projection matrices, ``uvs``: (N,2) pixels.  Each view's matrix is
    normalised first so views weigh alike regardless of the scale of ``P``.
    """
    rows = []
    for i, (P, (u, v)) in enumerate(zip(Ps, np.asarray(uvs, float))):
        P = np.asarray(P, float)
        P = P / np.linalg.norm(P[2, :3])
        w = 1.0 if weights is None else float(weights[i])
        rows.append(w * (u * P[2] - P[0]))
        rows.append(w * (v * P[2] - P[1]))
    A = np.asarray(rows)
    if len(A) < 4:
        raise ValueError("need at least two views to triangulate")
    _, _, Vt = np.linalg.svd(A)
    X = Vt[-1]
    if abs(X[3]) < 1e-12:
        raise ValueError("triangulated point is at infinity (parallel rays)")
    return X[:3] / X[3]


def triangulate_line(Ps, lines_2d, weights=None):
    """3D line from its 2D images in N >= 2 views (plane–plane intersection, least squares).

    ``lines_2d``: homogeneous 2D lines ``(a, b, c)``.  Each back-projects to the
    plane ``P^T l``; the 3D line is the (least-squares) common null space of the
    planes.  Returns ``(point_mm (3,), unit direction (3,))``.  Raises when the
    planes are (nearly) parallel, i.e. the line lies in an epipolar plane.
    """
    planes = []
    for i, (P, l) in enumerate(zip(Ps, lines_2d)):
        P = np.asarray(P, float)
        pi = P.T @ np.asarray(l, float)
        n = np.linalg.norm(pi[:3])
        if n == 0:
            raise ValueError("degenerate image line")
        w = 1.0 if weights is None else float(weights[i])
        planes.append(w * pi / n)
    A = np.asarray(planes)
    if len(A) < 2:
        raise ValueError("need at least two views to triangulate a line")
    normals = A[:, :3]
    direction = np.linalg.svd(normals)[2][-1]
    sv = np.linalg.svd(normals, compute_uv=False)
    if sv[1] < 1e-6:
        raise ValueError("back-projected planes are parallel: the line lies in an epipolar plane")
    # The point on the line closest to the origin satisfies normals @ x = -d and direction @ x = 0.
    M = np.vstack([normals, direction])
    b = np.concatenate([-A[:, 3], [0.0]])
    point = np.linalg.lstsq(M, b, rcond=None)[0]
    return point, direction / np.linalg.norm(direction)


def rotation_matrix(axis, angle_deg) -> np.ndarray:
    """Right-handed rotation about a world axis (Rodrigues)."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    th = np.deg2rad(angle_deg)
    Kx = _skew(a)
    return np.eye(3) + np.sin(th) * Kx + (1 - np.cos(th)) * Kx @ Kx


def carm_view(
    name: str = "AP",
    *,
    isocenter_mm=(0.0, 0.0, 0.0),
    lao_deg: float = 0.0,
    cranial_deg: float = 0.0,
    sid_mm: float = 600.0,
    sdd_mm: float = 1000.0,
    pixel_mm: float = 0.6,
    width: int = 512,
    height: int = 512,
    principal_offset_px=(0.0, 0.0),
    detector_roll_deg: float = 0.0,
) -> View:
    """A C-arm view of a supine patient around an isocentre (world RAS).

    At ``lao_deg = cranial_deg = 0`` the source is posterior and the detector
    anterior (AP): ``u`` runs towards the patient's right, ``v`` towards the
    feet.  ``lao_deg`` rotates the C-arm about the superior axis (+90: detector on the patient's
    left, source on the right: a lateral view), ``cranial_deg`` tilts it about the
    patient's right-left axis.  ``sid_mm``: source to isocentre, ``sdd_mm``:
    source to detector, ``pixel_mm``: detector pixel pitch.
    """
    iso = np.asarray(isocenter_mm, float)
    # AP camera axes in RAS (rows of R): x = +R (u), y = -S (v), z = +A (source -> detector).
    R0 = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    # Rotating the C-arm rotates the camera axes in the world.
    rot = rotation_matrix([0, 0, 1], lao_deg) @ rotation_matrix([1, 0, 0], cranial_deg)
    R = R0 @ rot.T
    if detector_roll_deg:
        R = rotation_matrix([0, 0, 1], detector_roll_deg) @ R
    source = iso - sid_mm * R[2]
    t = -R @ source
    f = sdd_mm / pixel_mm
    cu = (width - 1) / 2.0 + principal_offset_px[0]
    cv = (height - 1) / 2.0 + principal_offset_px[1]
    K = np.array([[f, 0, cu], [0, f, cv], [0, 0, 1.0]])
    return View(K=K, R=R, t=t, width=width, height=height, name=name)


def ap_view(**kw) -> View:
    kw.setdefault("name", "AP")
    return carm_view(lao_deg=0.0, **kw)


def lateral_view(**kw) -> View:
    kw.setdefault("name", "LAT")
    return carm_view(lao_deg=90.0, **kw)
