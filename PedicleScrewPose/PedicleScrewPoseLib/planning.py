"""Pedicle screw trajectories from a vertebra label map, and controlled misplacements.

For each requested level, :func:`plan_screws` works in the vertebra's own frame
(origin at the label's centroid; ``x`` to the patient's right, ``y`` anterior,
``z`` superior along the spine, from the neighbouring vertebrae), on the label
resampled to a 1 mm grid (trilinear, so thick CT slices give a smooth surface):

1. the spinal canal (vertebral foramen) is, in axial slices, the enclosed hole
   in the label next to the midline; it is closed only where the pedicles are,
   so its slices give the pedicles' height; the body is the bone in front of it
   (the canal-to-body direction also fixes the vertebra's axial rotation);
2. on each side, the pedicle is the label's cross-section (coronal slices, at
   the canal's height) nearest the canal between the body and the lamina; its
   **isthmus** is the slice of least area; its centre and medio-lateral width
   are measured there, its convergence from the centres of nearby slices;
3. the trajectory passes through the isthmus centre, converging medially by the
   mean of the pedicle's measured convergence and the level's typical value
   (clipped to 5-25 degrees), aimed caudally towards the body's mid-height; the
   **entry** is where that line leaves the label posteriorly, the **tip** stays
   ~5 mm inside the anterior cortex (catalogue length), the diameter is the
   largest catalogue size <= 80 % of the isthmus width;
4. if that screw breaches (> 0.3 mm), nearby angles (+-6 deg medial, +-4 deg
   cranial) and entry offsets (+-1 mm) are tried, then shorter and thinner screws.

``breach_mm`` is how far the shaft's outer surface (thread crests, from 5 mm
below the entry to the tip) lies outside the vertebra's label, from a signed
distance map of the label (0 when contained).

Sides are the patient's: "right" is RAS +x.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .screw import Screw, ScrewSpec, catalogue, outer_surface_points, pose_from_entry_tip

__all__ = [
    "plan_screws",
    "misplace",
    "breach_distance_mm",
    "vertebra_frame",
    "DEFAULT_LEVELS",
    "DIRECTIONS",
]

DEFAULT_LEVELS = ("T10", "T11", "T12", "L1", "L2", "L3")
DIRECTIONS = ("medial", "lateral", "cranial", "caudal")
SPINE_ORDER = ([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)]
               + [f"L{i}" for i in range(1, 6)] + ["S1"])

GRID_MM = 1.0             # local resampling of the label
GRID_MARGIN_MM = 12.0     # room around the label for outside distances
TIP_CLEARANCE_MM = 5.0    # tip stays this far inside the anterior cortex
ENTRY_SKIP_MM = 5.0       # shaft length below the entry not counted in breach (oblique entry surface)
MAX_DIAMETER_FRACTION = 0.8
MEDIAL_RANGE_DEG = (5.0, 25.0)
PLAN_BREACH_MM = 0.3      # a planned screw is accepted when it breaches no more than this


# --------------------------------------------------------------------------- public API
def plan_screws(labels, ct=None, levels=DEFAULT_LEVELS, rng=None, misplacement=None) -> list[Screw]:
    """Bilateral pedicle screws for each of ``levels`` present in ``labels``.

    ``labels``: a ``ct.LabelVolume`` whose ``names`` map values to "T12", "L1", ...
    ``ct``: the CT (HU) on any grid; not needed by the current method (kept for
    the interface and future cortical-bone refinement).
    ``rng``: ``np.random.Generator`` or int seed for small random variations (entry,
    angles +-3 deg, size one step down, roll); None gives the nominal, deterministic plan.
    ``misplacement``: None; a dict ``{screw_id: (direction, distance_mm)}``; or a
    probability p in [0, 1]: each screw is misplaced with probability p in a random
    direction by 1.5-6 mm (needs ``rng``).

    Returns screws with ids "T12-L"/"T12-R", ``level``, ``side`` and ``breach_mm``
    set (``extra["plan"]`` holds the measured isthmus and angles); misplaced ones
    carry ``extra["misplacement"]``. Levels absent from the label map, or whose
    canal / pedicles cannot be found, are skipped; ValueError if the label map
    names none of ``levels``.
    """
    if isinstance(levels, str):
        levels = (levels,)
    if not any(_value_of(labels, lv) is not None for lv in levels):
        raise ValueError(f"plan_screws: the label map {getattr(labels, 'path', None) or ''} names none of the levels "
                         f"{list(levels)} (its names: {sorted(set((getattr(labels, 'names', None) or {}).values()))[:12]}); "
                         f"give the label names, e.g. load_labels(path, names={{32: 'T12'}})")
    if rng is not None and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if isinstance(misplacement, (int, float)) and not isinstance(misplacement, bool):
        if not 0.0 <= float(misplacement) <= 1.0:
            raise ValueError(f"plan_screws: misplacement probability {misplacement} must be in [0, 1]")
        if rng is None and misplacement > 0:
            raise ValueError("plan_screws: a misplacement probability needs an rng")
    elif misplacement is not None and not isinstance(misplacement, dict):
        raise ValueError("plan_screws: misplacement must be None, a probability or a dict {id: (direction, mm)}")

    screws = []
    for level in levels:
        value = _value_of(labels, level)
        if value is None:
            continue
        try:
            vert = _vertebra(labels, value)
        except _NotFound:
            continue
        for side in ("left", "right"):
            try:
                s = _plan_one(vert, level, side, rng)
            except _NotFound:
                continue
            s.breach_mm = vert.breach_mm(s)
            screws.append(s)

    if misplacement is not None:
        out = []
        for s in screws:
            todo = None
            if isinstance(misplacement, dict):
                todo = misplacement.get(s.id)
            elif rng.random() < float(misplacement):
                todo = (DIRECTIONS[int(rng.integers(len(DIRECTIONS)))], float(rng.uniform(1.5, 6.0)))
            if todo and isinstance(misplacement, dict):
                out.append(misplace(s, todo[0], todo[1], labels))
            elif todo:
                try:
                    out.append(misplace(s, todo[0], todo[1], labels))
                except ValueError:  # that breach cannot be reached this way: keep the planned screw
                    out.append(s)
            else:
                out.append(s)
        screws = out
    return screws


def misplace(screw: Screw, direction: str, distance_mm: float, labels) -> Screw:
    """A copy of ``screw`` moved so its outer surface breaches its vertebra by ~``distance_mm``.

    The screw is translated perpendicular to its axis towards ``direction``
    ("medial": towards the midline / the canal, "lateral", "cranial", "caudal", in
    the vertebra's frame) by the smallest shift whose breach reaches
    ``distance_mm`` (bisection to 0.05 mm). ``screw.level`` must name a label.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"misplace: direction {direction!r} must be one of {DIRECTIONS}")
    if not (np.isfinite(distance_mm) and 0 < distance_mm <= 15):
        raise ValueError(f"misplace: distance_mm={distance_mm!r} must be in (0, 15]")
    value = _value_of(labels, screw.level) if screw.level else None
    if value is None:
        raise ValueError(f"misplace: screw {screw.id} has level {screw.level!r}, not a name in the label map")
    vert = _vertebra(labels, value)
    if screw.side in ("left", "right"):
        side = screw.side
    else:
        side = "right" if vert.to_frame(screw.entry_mm[None])[0, 0] > vert.anatomy().canal_centre[0] else "left"
    sgn = 1.0 if side == "right" else -1.0
    d_frame = {"medial": [-sgn, 0, 0], "lateral": [sgn, 0, 0], "cranial": [0, 0, 1], "caudal": [0, 0, -1]}[direction]
    d = vert.R @ np.asarray(d_frame, dtype=float)
    d -= np.dot(d, screw.axis) * screw.axis
    d /= np.linalg.norm(d)

    def moved(t):
        T = screw.T_world_from_screw.copy()
        T[:3, 3] += t * d
        return Screw(screw.spec, T, id=screw.id, level=screw.level, side=screw.side, breach_mm=None,
                     extra=dict(screw.extra))

    lo, hi = 0.0, 0.5
    while vert.breach_mm(moved(hi)) < distance_mm:
        lo, hi = hi, hi + 0.5
        if hi > 30.0:
            raise ValueError(f"misplace: cannot reach a {distance_mm} mm {direction} breach for screw {screw.id}")
    while hi - lo > 0.05:
        mid = 0.5 * (lo + hi)
        if vert.breach_mm(moved(mid)) < distance_mm:
            lo = mid
        else:
            hi = mid
    out = moved(hi)
    out.breach_mm = vert.breach_mm(out)
    out.extra["misplacement"] = {"direction": direction, "distance_mm": float(distance_mm), "shift_mm": float(hi)}
    return out


def breach_distance_mm(screw: Screw, labels, label_value: int | None = None) -> float:
    """How far (mm) the screw's outer thread envelope lies outside the label ``label_value``.

    Default label: the one named ``screw.level``. The first ``ENTRY_SKIP_MM`` of the
    shaft (where it crosses the oblique entry surface) are not counted. 0 when contained.
    """
    if label_value is None:
        label_value = _value_of(labels, screw.level) if screw.level else None
        if label_value is None:
            raise ValueError(f"breach_distance_mm: screw {screw.id} has no level in the label map; give label_value")
    return _vertebra(labels, int(label_value)).breach_mm(screw)


def vertebra_frame(labels, level_or_value) -> np.ndarray:
    """4x4 ``T_world_from_vertebra`` (x patient right, y anterior, z superior; origin at the centroid)."""
    value = level_or_value if isinstance(level_or_value, (int, np.integer)) else _value_of(labels, level_or_value)
    if value is None:
        raise ValueError(f"vertebra_frame: {level_or_value!r} is not in the label map")
    v = _vertebra(labels, int(value))
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = v.R, v.origin
    return T


# --------------------------------------------------------------------------- per vertebra
class _NotFound(ValueError):
    pass


def _value_of(labels, name):
    names = getattr(labels, "names", None) or {}
    for v, n in names.items():
        if n == name:
            return int(v)
    return None


# Per label map (keyed by id, checked through a weak reference): bounding boxes and the
# resampled vertebrae. A label map changed in place after planning is not noticed.
_CACHE: dict = {}


def _objects(labels):
    """Bounding slices of every label value (cached per label map)."""
    key = ("objects", id(labels))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is labels:
        return hit[1]
    objs = ndimage.find_objects(np.asarray(labels.array).astype(np.int32, copy=False)
                                if not np.issubdtype(labels.array.dtype, np.integer) else labels.array)
    _CACHE[key] = (weakref.ref(labels), objs)
    return objs


def _vertebra(labels, value: int) -> "_Vertebra":
    key = ("vertebra", id(labels), value)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is labels:
        return hit[1]
    v = _Vertebra(labels, value)
    # Keep the cache small: a few label maps' worth of vertebrae.
    if len(_CACHE) > 64:
        for k in [k for k, h in _CACHE.items() if h[0]() is None] or list(_CACHE)[:16]:
            _CACHE.pop(k, None)
    _CACHE[key] = (weakref.ref(labels), v)
    return v


def _centroid_world(labels, value, objs):
    if value <= 0 or value > len(objs) or objs[value - 1] is None:
        return None
    sl = objs[value - 1]
    k, j, i = np.nonzero(labels.array[sl] == value)
    if len(i) < 50:
        return None
    ijk = np.stack([i + sl[2].start, j + sl[1].start, k + sl[0].start], axis=1)
    return labels.ijk_to_ras_points(ijk).mean(axis=0)


@dataclass
class _Pedicle:
    centre: np.ndarray   # frame mm, isthmus centre
    width_mm: float      # medio-lateral width at the isthmus
    height_mm: float
    medial_deg: float    # the pedicle's own convergence


class _Vertebra:
    """One vertebra's label on a local 1 mm grid in its anatomical frame, with a signed distance map.

    Grid arrays are indexed ``[x, y, z]`` in the frame (x patient right, y anterior, z superior).
    """

    def __init__(self, labels, value: int):
        objs = _objects(labels)
        if value <= 0 or value > len(objs) or objs[value - 1] is None:
            raise _NotFound(f"label {value} absent")
        self.value = value
        sl = objs[value - 1]
        crop = labels.array[sl] == value
        if crop.sum() < 200:
            raise _NotFound(f"label {value} too small")
        k, j, i = np.nonzero(crop)
        ijk = np.stack([i + sl[2].start, j + sl[1].start, k + sl[0].start], axis=1).astype(float)
        pts = labels.ijk_to_ras_points(ijk)
        self.origin = pts.mean(axis=0)
        # Zero padding: the label ends where the image ends (a vertebra cut by the field of
        # view counts as ending there; breaches past the image edge are measured against it).
        pad = np.pad(crop.astype(np.float32), 1)
        self._pad_start = np.array([sl[2].start, sl[1].start, sl[0].start], float) - 1.0
        self._labels_geom = (labels, sl, pad, pts)
        self._set_frame(self._axes(labels, value, objs))
        self._sd = None
        self._anat = None
        self._peds = {}
        # Axial rotation: the AP axis runs from the canal's centre to the body's centre.
        try:
            anat = self.anatomy()
        except _NotFound:
            anat = None
        if anat is not None:
            psi = np.arctan2(anat.body_centre[0] - anat.canal_centre[0], anat.body_centre[1] - anat.canal_centre[1])
            if abs(np.degrees(psi)) > 2.0:
                c, s_ = np.cos(psi), np.sin(psi)
                Rz = np.array([[c, s_, 0.0], [-s_, c, 0.0], [0.0, 0.0, 1.0]])
                self._set_frame(self.R @ Rz)
                self._anat = None
        del self._labels_geom

    def _set_frame(self, R):
        """(Re)sample the label on a 1 mm grid in the frame with axes ``R`` (columns, world)."""
        labels, sl, pad, pts = self._labels_geom
        self.R = R
        local = (pts - self.origin) @ self.R
        lo = np.floor(local.min(axis=0) - GRID_MARGIN_MM)
        hi = np.ceil(local.max(axis=0) + GRID_MARGIN_MM)
        self.lo = lo
        self.h = GRID_MM
        n = ((hi - lo) / self.h).astype(int) + 1
        ga, gb, gc = [lo[d] + self.h * np.arange(n[d]) for d in range(3)]
        # Grid index (a, b, c) -> padded crop index (k, j, i) is affine: one affine_transform,
        # trilinear on the label's indicator -> a smooth surface despite thick slices.
        M = labels.ras_to_ijk
        A_ijk = M[:3, :3] @ self.R * self.h                       # d(ijk)/d(abc)
        o_ijk = M[:3, :3] @ (self.origin + self.R @ lo) + M[:3, 3]  # ijk of grid index 0
        start = self._pad_start
        matrix = A_ijk[::-1]                                      # rows k, j, i
        offset = (o_ijk - start)[::-1]
        self.mask = ndimage.affine_transform(pad, matrix, offset=offset, output_shape=tuple(int(v) for v in n),
                                             order=1, mode="constant", cval=0.0)
        self.inside = self.mask >= 0.5
        if self.inside.sum() < 200:
            raise _NotFound(f"label {self.value} vanished on resampling")
        self.xs, self.ys, self.zs = ga, gb, gc

    def _axes(self, labels, value, objs):
        """Frame axes (columns x=R, y=A, z=S in world) from the neighbours' centroids."""
        name = labels.names.get(value)
        up = down = None
        if name in SPINE_ORDER:
            idx = SPINE_ORDER.index(name)
            vals = {n: v for v, n in labels.names.items()}
            if idx > 0 and SPINE_ORDER[idx - 1] in vals:
                up = _centroid_world(labels, vals[SPINE_ORDER[idx - 1]], objs)
            if idx + 1 < len(SPINE_ORDER) and SPINE_ORDER[idx + 1] in vals:
                down = _centroid_world(labels, vals[SPINE_ORDER[idx + 1]], objs)
        if up is not None and down is not None:
            z = up - down
        elif up is not None:
            z = up - self.origin
        elif down is not None:
            z = self.origin - down
        else:
            z = np.array([0.0, 0.0, 1.0])
        z = z / np.linalg.norm(z)
        if z[2] < 0.5:  # implausible (neighbour labels wrong): fall back to the world's S
            z = np.array([0.0, 0.0, 1.0])
        y = np.array([0.0, 1.0, 0.0]) - z[1] * z
        y /= np.linalg.norm(y)
        x = np.cross(y, z)
        return np.stack([x, y, z], axis=1)

    # --- coordinates
    def to_frame(self, world_mm):
        return (np.asarray(world_mm, float).reshape(-1, 3) - self.origin) @ self.R

    def to_world(self, frame_mm):
        return self.origin + np.asarray(frame_mm, float).reshape(-1, 3) @ self.R.T

    def _grid_coords(self, frame_mm):
        return ((np.asarray(frame_mm, float).reshape(-1, 3) - self.lo) / self.h).T

    def mask_at(self, frame_mm):
        return ndimage.map_coordinates(self.mask, self._grid_coords(frame_mm), order=1, mode="constant", cval=0.0)

    @property
    def signed_distance(self):
        """mm, > 0 outside the label, < 0 inside; boundary half-way between voxel centres."""
        if self._sd is None:
            out = ndimage.distance_transform_edt(~self.inside, sampling=self.h)
            ins = ndimage.distance_transform_edt(self.inside, sampling=self.h)
            self._sd = np.where(self.inside, -(ins - 0.5 * self.h), out - 0.5 * self.h).astype(np.float32)
        return self._sd

    def sd_at(self, frame_mm):
        """Signed distance (mm) at frame points; beyond the grid, the edge value plus the distance past it."""
        g = self._grid_coords(frame_mm)
        sd = ndimage.map_coordinates(self.signed_distance, g, order=1, mode="nearest")
        past = np.linalg.norm(np.maximum(0, np.maximum(-g.T, g.T - (np.array(self.mask.shape) - 1))), axis=1)
        return sd + past * self.h

    def breach_mm(self, screw: Screw) -> float:
        pts = outer_surface_points(screw.spec, n_around=32)
        pts = pts[pts[:, 2] >= min(ENTRY_SKIP_MM, 0.5 * screw.spec.length_mm)]
        return float(max(0.0, self.sd_at(self.to_frame(screw.to_world(pts))).max()))

    # --- anatomy
    def anatomy(self) -> "_Anatomy":
        """The spinal canal (vertebral foramen) and the body, in frame mm; cached.

        The foramen is, in axial slices, the enclosed hole in the label nearest the
        midline; it is closed only at the level of the pedicles, which it thereby locates.
        """
        if self._anat is not None:
            return self._anat
        ins = self.inside
        st = np.zeros((3, 3, 3), bool)
        st[1, :, 1] = st[:, 1, 1] = True  # 4-connectivity within each axial slice only
        bg, n = ndimage.label(~ins, structure=st)
        objs = ndimage.find_objects(bg)
        nx, ny, _ = ins.shape
        x0 = float(np.average(self.xs, weights=ins.sum(axis=(1, 2))))
        best = {}  # z index -> (area, label)
        for lab_i, o in enumerate(objs, start=1):
            if o is None or o[0].start == 0 or o[1].start == 0 or o[0].stop == nx or o[1].stop == ny:
                continue  # touches the slice border: outside, not a hole
            area = np.count_nonzero(bg[o] == lab_i) * self.h**2
            if area < 30.0:
                continue
            xc = 0.5 * (self.xs[o[0].start] + self.xs[o[0].stop - 1])
            if abs(xc - x0) > 15.0:
                continue
            kz = o[2].start
            if area > best.get(kz, (0, 0))[0]:
                best[kz] = (area, lab_i)
        if not best:
            raise _NotFound(f"label {self.value}: no closed vertebral foramen")
        # Longest run of consecutive slices with a foramen.
        ks = np.array(sorted(best))
        runs = np.split(ks, np.nonzero(np.diff(ks) > 1)[0] + 1)
        run = max(runs, key=lambda r: sum(best[k][0] for k in r))
        hole = np.zeros_like(ins)
        for kz in run:
            hole[..., kz] = bg[..., kz] == best[kz][1]
        ii, jj, kk = np.nonzero(hole)
        canal_centre = np.array([self.xs[ii].mean(), self.ys[jj].mean(), self.zs[kk].mean()])
        y_post = float(np.percentile(self.ys[jj], 5))
        y_ant = float(np.percentile(self.ys[jj], 95))
        # Body: bone in front of the canal, near the midline.
        xsel = np.abs(self.xs - canal_centre[0]) < 25.0
        ysel = self.ys > y_ant + 1.0
        body = ins[np.ix_(xsel, ysel, np.ones(len(self.zs), bool))]
        bi, bj, bk = np.nonzero(body)
        if len(bi) < 100:
            raise _NotFound(f"label {self.value}: no vertebral body in front of the canal")
        body_centre = np.array([self.xs[xsel][bi].mean(), self.ys[ysel][bj].mean(), self.zs[bk].mean()])
        self._anat = _Anatomy(canal_centre=canal_centre, canal_y=(y_post, y_ant),
                              canal_z=(float(self.zs[run[0]]), float(self.zs[run[-1]])), body_centre=body_centre)
        return self._anat

    def pedicle(self, side: str) -> _Pedicle:
        if side in self._peds:
            return self._peds[side]
        an = self.anatomy()
        s = 1.0 if side == "right" else -1.0
        ins = self.inside
        x_mid = an.canal_centre[0]
        xsel = (s * (self.xs - x_mid) > 2.0) & (s * (self.xs - x_mid) < 40.0)
        zsel = (self.zs >= an.canal_z[0] - 4.0) & (self.zs <= an.canal_z[1] + 4.0)
        y_post, y_ant = an.canal_y
        rows = np.nonzero((self.ys >= y_post + 0.2 * (y_ant - y_post)) & (self.ys <= y_ant + 4.0))[0]
        if len(rows) < 3:
            raise _NotFound(f"no {side} pedicle")
        xs, zs = self.xs[xsel], self.zs[zsel]
        areas, cents, widths, heights = [], [], [], []
        for b in rows:
            sl = ins[np.ix_(xsel, [b], zsel)][:, 0, :]
            lab, n = ndimage.label(sl)
            best, best_d = None, np.inf
            if n:
                sizes = ndimage.sum(sl, lab, index=np.arange(1, n + 1))
                for c in range(1, n + 1):
                    if sizes[c - 1] < 4:
                        continue
                    # The component nearest the canal is the pedicle (processes and ribs lie lateral).
                    d = np.min(np.abs(xs[np.nonzero((lab == c).any(axis=1))[0]] - x_mid))
                    if d < best_d:
                        best, best_d = c, d
            if best is None:
                areas.append(np.inf); cents.append(None); widths.append(0.0); heights.append(0.0)
                continue
            comp = lab == best
            ii, kk = np.nonzero(comp)
            areas.append(comp.sum() * self.h**2)
            cents.append((xs[ii].mean(), zs[kk].mean()))
            widths.append((ii.max() - ii.min() + 1) * self.h)
            heights.append((kk.max() - kk.min() + 1) * self.h)
        areas = np.array(areas)
        if not np.isfinite(areas).any():
            raise _NotFound(f"no {side} pedicle")
        sm = np.where(np.isfinite(areas), areas, 1e9)
        sm = np.convolve(np.pad(sm, 1, mode="edge"), np.ones(3) / 3, mode="valid")
        m = int(np.argmin(sm))
        if cents[m] is None:
            raise _NotFound(f"no {side} pedicle")
        ys_rows = self.ys[rows]
        centre = np.array([cents[m][0], ys_rows[m], cents[m][1]])
        # The pedicle's own convergence: least-squares x(y) of the centres around the isthmus.
        near = [r for r in range(max(0, m - 5), min(len(rows), m + 6))
                if cents[r] is not None and areas[r] < 2.5 * areas[m]]
        medial = np.nan
        if len(near) >= 4:
            slope = np.polyfit(ys_rows[near], [cents[r][0] for r in near], 1)[0]
            medial = float(np.degrees(np.arctan(-s * slope)))
        ped = _Pedicle(centre=centre, width_mm=float(widths[m]), height_mm=float(heights[m]), medial_deg=medial)
        self._peds[side] = ped
        return ped

    def line_extent(self, point, d, back_mm=60.0, fwd_mm=90.0, step=0.25):
        """Along ``point + t d`` (frame): distance back to where it leaves the label, and forward to its last exit."""
        tb = np.arange(0.0, back_mm, step)
        inside_b = self.mask_at(point - tb[:, None] * d) >= 0.5
        out_b = np.nonzero(~inside_b)[0]
        t_entry = tb[out_b[0] - 1] if len(out_b) and out_b[0] > 0 else (0.0 if len(out_b) else back_mm)
        tf = np.arange(0.0, fwd_mm, step)
        inside_f = self.mask_at(point + tf[:, None] * d) >= 0.5
        t_front = tf[np.nonzero(inside_f)[0][-1]] if inside_f.any() else 0.0
        return t_entry, t_front


@dataclass
class _Anatomy:
    canal_centre: np.ndarray      # frame mm
    canal_y: tuple                # (posterior, anterior) y of the foramen, mm
    canal_z: tuple                # (lowest, highest) z where the foramen is closed, mm
    body_centre: np.ndarray       # frame mm


# --------------------------------------------------------------------------- one screw
_CAT = None


def _catalogue_sizes():
    global _CAT
    if _CAT is None:
        cat = catalogue()
        _CAT = (sorted({c.diameter_mm for c in cat}), sorted({c.length_mm for c in cat}))
    return _CAT


# Typical transverse (medial) pedicle angle by level, degrees (thoracolumbar morphometry).
MEDIAL_PRIOR_DEG = {**{f"T{i}": 10.0 for i in range(1, 10)}, "T10": 8.0, "T11": 8.0, "T12": 8.0,
                    "L1": 10.0, "L2": 12.0, "L3": 15.0, "L4": 18.0, "L5": 22.0, "S1": 25.0}


def _plan_one(vert: _Vertebra, level: str, side: str, rng) -> Screw:
    an = vert.anatomy()
    ped = vert.pedicle(side)
    x_mid = an.canal_centre[0]
    s = 1.0 if side == "right" else -1.0
    diameters, lengths = _catalogue_sizes()

    # Medial angle: the pedicle's measured convergence, steadied by the level's typical value.
    prior = MEDIAL_PRIOR_DEG.get(level, 12.0)
    medial = 0.5 * (ped.medial_deg + prior) if np.isfinite(ped.medial_deg) else prior
    medial = float(np.clip(medial, *MEDIAL_RANGE_DEG))
    # Cranio-caudal: from the isthmus towards the body's mid-height (away from the endplate).
    centre = ped.centre.copy()
    dz = an.body_centre[2] + 0.3 * (centre[2] - an.body_centre[2]) - centre[2]
    dy = max(an.body_centre[1] + 8.0 - centre[1], 10.0)
    cranial = float(np.clip(np.degrees(np.arctan2(dz, dy)), -15.0, 15.0))
    if rng is not None:
        medial = float(np.clip(medial + rng.normal(0, 3.0), *MEDIAL_RANGE_DEG))
        cranial = float(cranial + rng.normal(0, 3.0))
        centre[[0, 2]] += rng.normal(0, 0.3, 2) * [min(1.0, 0.1 * ped.width_mm), 1.0]

    # Diameter: largest catalogue size within 80 % of the isthmus width (sometimes one smaller).
    fit = [d for d in diameters if d <= MAX_DIAMETER_FRACTION * ped.width_mm]
    di = len(fit) - 1 if fit else 0
    if rng is not None and di > 0 and rng.random() < 0.25:
        di -= 1
    shorter = rng is not None and rng.random() < 0.25
    sid = f"{level}-{'L' if side == 'left' else 'R'}"
    roll = 0.0 if rng is None else float(rng.choice([0.0, 180.0]) + rng.normal(0, 15.0))

    def make(med, cra, ctr, dia):
        """The screw along (medial, cranial) through ``ctr``, longest that fits (shortened if the tip breaches)."""
        med = float(np.clip(med, *MEDIAL_RANGE_DEG))
        for _ in range(8):  # keep each tip on its own side of the midline
            a, c = np.radians(med), np.radians(cra)
            d = np.array([-s * np.sin(a) * np.cos(c), np.cos(a) * np.cos(c), np.sin(c)])
            t_back, t_front = vert.line_extent(ctr, d)
            entry = ctr - t_back * d
            fit_l = [L for L in lengths if L <= t_back + t_front - TIP_CLEARANCE_MM] or [lengths[0]]
            li = len(fit_l) - 1 - (1 if shorter and len(fit_l) > 1 else 0)
            tip_x = entry[0] + fit_l[li] * d[0]
            if s * (tip_x - x_mid) >= 0.5 * dia + 1.0 or med <= MEDIAL_RANGE_DEG[0]:
                break
            med = max(MEDIAL_RANGE_DEG[0], med - 2.0)
        entry_w = vert.to_world(entry)[0]
        axis_w = vert.R @ d
        best = None
        for L in fit_l[: li + 1][::-1][:3]:
            T = pose_from_entry_tip(entry_w, entry_w + L * axis_w, roll)
            sc = Screw(ScrewSpec.from_size(dia, L), T, id=sid, level=level, side=side)
            sc.extra["plan"] = {"isthmus_width_mm": ped.width_mm, "isthmus_height_mm": ped.height_mm,
                                "medial_deg": med, "cranial_deg": cra}
            b, z_at = _breach_where(vert, sc)
            if best is None or b < best[1] - 0.05:
                best = (sc, b)
            if b <= PLAN_BREACH_MM or z_at < 0.75 * L:
                break  # contained, or the breach is not at the tip (shortening will not help)
        return best

    # Nominal trajectory first; if it breaches, search nearby angles / offsets, then thinner screws.
    deviations = sorted(
        [(dm, dc, dx) for dm in (0.0, -3.0, 3.0, -6.0, 6.0) for dc in (0.0, -4.0, 4.0) for dx in (0.0, -1.0, 1.0)],
        key=lambda t: abs(t[0]) / 3 + abs(t[1]) / 4 + abs(t[2]))
    dia0 = diameters[max(di, 0)]
    first = make(medial, cranial, centre, dia0)
    if first[1] <= PLAN_BREACH_MM:
        return first[0]
    # Each candidate's breach shrinks about one-for-one with the radius: pick the candidate that
    # keeps the thickest catalogue screw, then confirm (thinning further if needed).
    scored = []
    for order, (dm, dc, dx) in enumerate(deviations):
        ctr = centre + np.array([dx, 0.0, 0.0])
        sc, b = (first if order == 0 else make(medial + dm, cranial + dc, ctr, dia0))
        d_fit = dia0 - 2.0 * max(0.0, b - PLAN_BREACH_MM)
        snapped = max([d for d in diameters if d <= d_fit + 1e-9], default=diameters[0])
        scored.append((-snapped, order, b, (dm, dc, dx)))
    scored.sort()
    fallback = None
    for _, _, _, (dm, dc, dx) in scored[:3]:
        ctr = centre + np.array([dx, 0.0, 0.0])
        for dia in [d for d in diameters if d <= dia0][::-1][:5]:
            sc, b = make(medial + dm, cranial + dc, ctr, dia)
            if b <= PLAN_BREACH_MM:
                return sc
            if fallback is None or b < fallback[1]:
                fallback = (sc, b)
    return fallback[0]


def _breach_where(vert: _Vertebra, screw: Screw):
    """(breach mm, screw-frame z of the worst point)."""
    pts = outer_surface_points(screw.spec, n_around=32)
    pts = pts[pts[:, 2] >= min(ENTRY_SKIP_MM, 0.5 * screw.spec.length_mm)]
    sd = vert.sd_at(vert.to_frame(screw.to_world(pts)))
    i = int(np.argmax(sd))
    return float(max(0.0, sd[i])), float(pts[i, 2])
