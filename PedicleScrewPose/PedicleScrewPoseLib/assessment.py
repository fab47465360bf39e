"""Clinical read-out of placed screws against the CT: level, side, trajectory, breach grade.

For each screw of a result (``result.json`` screw entries, world RAS mm) and a
vertebra label map (TotalSegmentator-style: vertebrae named ``"T12"``, ``"L1"``,
...; optionally the CT in HU on any grid in the same world frame):

* **level**: the vertebra whose label holds most of the shaft (points sampled
  inside the shaft);
* **vertebra frame**: per vertebra, from its label only: origin at the body
  centre (on the mid-sagittal plane), ``x`` the patient's right, ``y``
  anterior, ``z`` superior. ``z`` is the endplate normal (smallest principal
  axis of the vertebral body's core), its sign from the named neighbours
  (T11 is above T12); ``y`` points from the posterior elements to the body;
  the sagittal plane is then refined by the mirror symmetry of the whole
  vertebra. Nothing uses the world axes, so a rotated spine is named right;
* **side**: which side of that vertebra's sagittal plane the entry point is on;
* **trajectory**: transverse (medial) angle and sagittal angle of the
  entry-to-tip direction in the vertebra frame, and how far the screw axis
  passes from the pedicle centre (the pedicle isthmus found on the label);
* **breach**: how far the screw's outer surface (thread crests, radius =
  diameter / 2, tapering over the tip) goes outside the vertebra's bone, mm,
  0 when fully contained: the largest signed distance to the bone surface
  over points of the outer envelope. The distance field is a Euclidean
  distance transform of the bone mask resampled to ~0.7 mm (the example CT
  has 2.5 mm slices), sampled trilinearly. Bone is the vertebra's label (the
  definition the simulator's truth uses); optionally (``bone="ct"``) label
  voxels in a thin rim at the label's surface that are darker than cortex on
  the CT are not counted (the label's over-segmentation), the inside
  (cancellous bone) always is. The first ``ENTRY_SKIP_MM`` of shaft below the
  entry are not counted (it crosses the oblique posterior surface by design);
* **direction** of the breach (medial / lateral / cranial / caudal /
  anterior / posterior): the outward normals of the screw's envelope averaged
  over the points outside bone (weighted by how far out), in the vertebra
  frame; per direction, the largest breach of the points facing it
  (``directions_mm``); a breach into the spinal canal (points of the envelope
  outside bone and inside the vertebral foramen's footprint, found as the
  holes of the label in axial slices at the pedicles' height; counted by the
  lesser of the two depths) is flagged on its own (``medial_flag``,
  ``canal_mm``), whatever the worst direction, since it faces the cord;
* **grade** (Gertzbein-Robbins): A no breach, B < 2 mm, C 2-4 mm, D 4-6 mm,
  E > 6 mm (boundaries belong to the higher grade);
* **uncertainty**: a pose standard deviation (mm; explicit, or the screw's
  ``pose_sigma_mm``, or from its ``confidence``) moves the signed breach by
  at most that much (the distance is 1-Lipschitz); when
  ``signed breach +- sigma`` spans more than one grade the screw says so
  (``grade_uncertain``, ``grade_range``).

Frames: world RAS mm everywhere; "vertebra frame" as above.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "GRADES",
    "GRADE_EDGES_MM",
    "GRADE_COLORS",
    "assess_screws",
    "assess_screw",
    "Anatomy",
    "Vertebra",
    "grade_from_breach_mm",
    "grade_range",
    "sigma_from_confidence",
    "vertebra_names",
    "level_index",
    "screw_pose",
]

GRADES = ("A", "B", "C", "D", "E")
#: Lower bounds (mm) of grades B, C, D, E; a breach of exactly 2.0 mm is grade C.
GRADE_EDGES_MM = (0.0, 2.0, 4.0, 6.0)
#: Colours used to draw a screw of each grade (report, Slicer table); None = not assessed.
GRADE_COLORS = {"A": "#1a9850", "B": "#91cf60", "C": "#fd8d3c", "D": "#e31a1c", "E": "#800026", None: "#9e9e9e"}
#: Breaches at or below this (mm) count as contained (grade A): below the resolution of a label
#: made on CT (the example CT has 2.5 mm slices); planning also accepts a planned screw up to it.
CONTAINED_TOLERANCE_MM = 0.5
#: A breach into the spinal canal beyond this (mm) raises ``medial_flag`` (the same tolerance as grade A).
MEDIAL_FLAG_MM = CONTAINED_TOLERANCE_MM
#: Which bone the breach is measured against by default: "label" (the vertebra's label, the same
#: definition as truth.json's breach_mm from planning.py) or "ct" (the label less its rim voxels
#: darker than cortex). bench/bench_assessment.py measures both against the truth.
DEFAULT_BONE = "label"
#: The first millimetres of shaft below the entry are not counted: there the shaft crosses the
#: oblique posterior bone surface by design. The same definition as the simulator's truth
#: (planning.ENTRY_SKIP_MM, planning.breach_distance_mm).
ENTRY_SKIP_MM = 5.0

_VERTEBRA_RE = re.compile(r"^([CTLS])(\d{1,2})$")
_REGION_OFFSET = {"C": 0, "T": 7, "L": 20, "S": 26}


# ----------------------------------------------------------------------------- public API
def assess_screws(screws: list[dict], ct, labels, pose_sigma=None, *, anatomy: "Anatomy | None" = None,
                  bone: str | None = None) -> list[dict]:
    """Level, side, trajectory and breach for each result screw.

    ``screws``: result.json screw entries (``entry_mm``, ``tip_mm`` RAS mm,
    ``diameter_mm``, ``length_mm``, optional ``transform``, ``confidence``,
    ``pose_sigma_mm``). ``ct``: HU Volume or None (then the label alone is the
    bone). ``labels``: LabelVolume with vertebra names. ``pose_sigma``: pose
    standard deviation in mm used for every screw (overrides per-screw
    values), or None. ``anatomy``: a prepared :class:`Anatomy` to reuse its
    per-vertebra distance fields across calls. ``bone``: "label" or "ct"
    (default "label": the simulator's truth uses the label, see ``DEFAULT_BONE``).

    Returns new dicts: each input entry plus ``level``, ``side``, ``breach``
    and ``trajectory`` (see the module docstring).
    """
    if not isinstance(screws, (list, tuple)):
        raise ValueError(f"assess_screws: screws must be a list of result screw entries, got {type(screws).__name__}")
    if anatomy is None:
        if labels is None:
            raise ValueError("assess_screws: a label volume (vertebra labels) is needed to assess screws")
        anatomy = Anatomy(labels, ct, bone=bone)
    return [assess_screw(s, anatomy, pose_sigma=pose_sigma, where=f"screws[{i}]") for i, s in enumerate(screws)]


def assess_screw(screw: dict, anatomy: "Anatomy", pose_sigma=None, where: str = "screw") -> dict:
    """One result screw entry → a copy with ``level``, ``side``, ``breach``, ``trajectory``."""
    T, diameter_mm, length_mm = screw_pose(screw, where)
    out = dict(screw)
    entry = T[:3, 3]
    axis = T[:3, 2]
    tip = entry + length_mm * axis
    radius = 0.5 * diameter_mm

    not_assessed = {"grade": None, "max_mm": None, "direction": None, "medial_flag": False,
                    "grade_uncertain": False, "grade_range": [None, None], "signed_mm": None,
                    "sigma_mm": None, "directions_mm": {}}
    label, fraction = anatomy.level_of_shaft(entry, axis, length_mm, radius)
    if label is None:
        out.update(level=None, side=None, level_fraction=0.0, breach=not_assessed, trajectory=None)
        return out
    try:
        vert = anatomy.vertebra(label)
    except ValueError as exc:  # a label too small or odd to build a frame from: name it, grade nothing
        out.update(level=anatomy.names.get(label), side=None, level_fraction=round(float(fraction), 3),
                   breach={**not_assessed, "error": str(exc)}, trajectory=None)
        return out
    side = vert.side_of(entry)
    out["level"] = vert.name
    out["side"] = side
    out["level_fraction"] = round(float(fraction), 3)

    # ---- breach
    b = vert.breach(entry, axis, length_mm, radius, side)
    sigma = _sigma_for(screw, pose_sigma)
    g = grade_from_breach_mm(b["max_mm"])
    lo, hi = grade_range(b["signed_mm"], sigma)
    if b["beyond_scan_fraction"] > 0:
        hi = "E"  # part of the screw is outside the scan: any breach there is possible
    out["breach"] = {
        "grade": g,
        "max_mm": round(b["max_mm"], 3),
        "direction": b["direction"],
        "medial_flag": bool(b["canal_mm"] > MEDIAL_FLAG_MM),
        "canal_mm": round(b["canal_mm"], 3),
        "grade_uncertain": lo != hi,
        "grade_range": [lo, hi],
        "signed_mm": round(b["signed_mm"], 3),
        "sigma_mm": None if sigma is None else round(float(sigma), 3),
        "directions_mm": {k: round(v, 3) for k, v in b["directions_mm"].items()},
        "bone": anatomy.bone,
        "beyond_scan": b["beyond_scan_fraction"] > 0,
    }
    out["trajectory"] = vert.trajectory(entry, tip, side)
    return out


def grade_from_breach_mm(breach_mm) -> str | None:
    """Gertzbein-Robbins grade of a breach distance (mm): A none, B < 2, C 2-4, D 4-6, E > 6.

    Breaches at or below ``CONTAINED_TOLERANCE_MM`` are A; a boundary value
    belongs to the higher grade (2.0 mm is C). None → None.
    """
    if breach_mm is None:
        return None
    b = float(breach_mm)
    if not math.isfinite(b):
        raise ValueError(f"grade_from_breach_mm: breach {breach_mm!r} is not a finite number (mm)")
    if b <= CONTAINED_TOLERANCE_MM:
        return "A"
    for grade, edge in zip(("E", "D", "C"), GRADE_EDGES_MM[:0:-1]):
        if b >= edge:
            return grade
    return "B"


def grade_range(signed_breach_mm, sigma_mm) -> tuple[str | None, str | None]:
    """(lowest, highest) grade of a signed breach (mm, < 0 = clearance) moved by ± ``sigma_mm``."""
    if signed_breach_mm is None:
        return (None, None)
    s = float(signed_breach_mm)
    d = 0.0 if sigma_mm is None else abs(float(sigma_mm))
    return (grade_from_breach_mm(max(s - d, 0.0)), grade_from_breach_mm(max(s + d, 0.0)))


def sigma_from_confidence(confidence) -> float | None:
    """Pose standard deviation (mm) assumed for a pose ``confidence`` in [0, 1].

    An engineering mapping, not a calibrated one: 0.5 mm at confidence 1 (the
    pose bench's typical error), growing linearly to 3.5 mm at confidence 0.
    """
    if confidence is None:
        return None
    c = float(confidence)
    if not math.isfinite(c):
        return None
    c = min(max(c, 0.0), 1.0)
    return 0.5 + 3.0 * (1.0 - c)


def vertebra_names(labels) -> dict[int, str]:
    """{label value: name} of the vertebrae ("C1".."C7", "T1".."T13", "L1".."L6", "S1"..) in ``labels.names``."""
    names = getattr(labels, "names", None) or {}
    return {int(k): str(v) for k, v in names.items() if _VERTEBRA_RE.match(str(v))}


def level_index(name: str) -> int | None:
    """Cranio-caudal order of a vertebra name (C1 = 0, T1 = 7, L1 = 20, S1 = 26); None if not a vertebra."""
    m = _VERTEBRA_RE.match(str(name))
    if not m:
        return None
    return _REGION_OFFSET[m.group(1)] + int(m.group(2)) - 1


def screw_pose(screw: dict, where: str = "screw") -> tuple[np.ndarray, float, float]:
    """(T_world_from_screw (4,4), diameter_mm, length_mm) of a result/truth screw entry.

    The axis and length come from ``entry_mm``/``tip_mm`` when both are there
    (they define the screw in CASE_FORMAT), else from ``transform`` and ``length_mm``.
    """
    if not isinstance(screw, dict):
        raise ValueError(f"{where}: expected a screw entry (object), got {type(screw).__name__}")
    try:
        diameter = float(screw["diameter_mm"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: 'diameter_mm' must be a positive number (mm), got {screw.get('diameter_mm')!r}") from None
    if not (diameter > 0 and math.isfinite(diameter)):
        raise ValueError(f"{where}: 'diameter_mm' must be a positive number (mm), got {diameter!r}")
    entry = _vec3(screw.get("entry_mm"), f"{where}.entry_mm")
    if screw.get("tip_mm") is not None:
        tip = _vec3(screw.get("tip_mm"), f"{where}.tip_mm")
        length = float(np.linalg.norm(tip - entry))
        if length < 1e-6:
            raise ValueError(f"{where}: entry_mm and tip_mm coincide")
        z = (tip - entry) / length
    elif screw.get("transform") is not None:
        M = np.asarray(screw["transform"], float)
        if M.shape != (4, 4) or not np.all(np.isfinite(M)):
            raise ValueError(f"{where}.transform must be a finite 4x4 matrix")
        z = M[:3, 2] / np.linalg.norm(M[:3, 2])
        try:
            length = float(screw["length_mm"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: 'length_mm' is needed when 'tip_mm' is absent") from None
    else:
        raise ValueError(f"{where}: needs 'tip_mm' (or 'transform' and 'length_mm')")
    T = np.eye(4)
    ref = np.array([0.0, 0.0, 1.0]) if abs(z[2]) < 0.95 else np.array([1.0, 0.0, 0.0])
    x = ref - (ref @ z) * z
    x /= np.linalg.norm(x)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, np.cross(z, x), z, entry
    return T, diameter, length


# ----------------------------------------------------------------------------- anatomy
class Anatomy:
    """Vertebrae of one label map (and optional CT), prepared lazily and cached per vertebra.

    ``labels``: LabelVolume (``array`` [k, j, i] integers, ``ijk_to_ras``,
    ``names``). ``ct``: Volume in HU (any grid in the same world) or None.
    ``bone``: "label" or "ct" (default ``DEFAULT_BONE``). ``voxel_mm``:
    target spacing of the resampled per-vertebra grid. ``margin_mm``: how far
    around each vertebra its distance field reaches (beyond that, a breach
    saturates at about this value).
    """

    def __init__(self, labels, ct=None, *, bone: str | None = None, voxel_mm: float = 0.7,
                 margin_mm: float = 16.0, cortex_hu: float = 150.0, rim_mm: float = 1.5):
        if labels is None or not hasattr(labels, "array") or not hasattr(labels, "ijk_to_ras"):
            raise ValueError("Anatomy: labels must be a LabelVolume (array [k,j,i] + ijk_to_ras + names)")
        self.labels = labels
        self.ct = ct
        self.bone = bone or DEFAULT_BONE
        if self.bone not in ("label", "ct"):
            raise ValueError(f"Anatomy: bone must be 'label' or 'ct', got {self.bone!r}")
        if self.bone == "ct" and ct is None:
            raise ValueError("Anatomy: bone='ct' needs a CT volume")
        self.voxel_mm = float(voxel_mm)
        self.margin_mm = float(margin_mm)
        self.cortex_hu = float(cortex_hu)
        self.rim_mm = float(rim_mm)
        self.names = vertebra_names(labels)
        if not self.names:
            raise ValueError("Anatomy: the label volume names no vertebrae (expected names like 'T12', 'L1' in labels.names)")
        arr = np.asarray(labels.array)
        if arr.dtype.kind == "f":
            arr = np.rint(arr)
        self._arr = arr.astype(np.int32, copy=False) if arr.dtype.kind not in "iu" else arr
        self.M = np.asarray(labels.ijk_to_ras, float)
        self.M_inv = np.linalg.inv(self.M)
        self.spacing = np.linalg.norm(self.M[:3, :3], axis=0)  # (i, j, k) mm
        max_label = int(max(self.names))
        objs = ndimage.find_objects(np.where(self._arr <= max_label, self._arr, 0).astype(np.int32, copy=False),
                                    max_label=max_label)
        self.boxes = {}
        self.centroids = {}
        for v in sorted(self.names):
            sl = objs[v - 1] if v - 1 < len(objs) else None
            if sl is None:
                continue
            sub = self._arr[sl] == v
            kji = np.argwhere(sub).mean(axis=0) + [s.start for s in sl]
            self.boxes[v] = sl
            self.centroids[v] = self._ijk_to_ras(kji[::-1][None])[0]
        if not self.boxes:
            raise ValueError("Anatomy: none of the named vertebrae is present in the label array")
        self._cache: dict[int, Vertebra] = {}

    # -- coordinates
    def _ijk_to_ras(self, ijk):
        return np.asarray(ijk, float) @ self.M[:3, :3].T + self.M[:3, 3]

    def _ras_to_ijk(self, ras):
        return np.asarray(ras, float) @ self.M_inv[:3, :3].T + self.M_inv[:3, 3]

    @property
    def present(self) -> dict[int, str]:
        """{label: name} of the vertebrae present in the array."""
        return {v: self.names[v] for v in self.boxes}

    def vertebra(self, label: int) -> "Vertebra":
        """The prepared vertebra of label value ``label`` (cached)."""
        label = int(label)
        if label not in self.boxes:
            raise ValueError(f"Anatomy: vertebra label {label} is not in the label volume")
        if label not in self._cache:
            self._cache[label] = Vertebra(self, label)
        return self._cache[label]

    def label_at(self, ras_mm) -> np.ndarray:
        """Label values (nearest voxel) at RAS points (N,3); 0 outside the grid."""
        ijk = np.rint(self._ras_to_ijk(np.atleast_2d(ras_mm))).astype(int)
        shape = np.array(self._arr.shape[::-1])
        ok = np.all((ijk >= 0) & (ijk < shape), axis=1)
        out = np.zeros(len(ijk), dtype=np.int64)
        out[ok] = self._arr[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]]
        return out

    def level_of_shaft(self, entry, axis, length_mm, radius_mm) -> tuple[int | None, float]:
        """(vertebra label holding most of the shaft, fraction of shaft samples in it).

        Samples the shaft volume (axis and a ring at half the radius, every
        0.5 mm) and takes the vertebra label holding most samples. When no
        sample is in any vertebra (a screw entirely out of bone), the nearer of
        the two vertebrae whose centroids are nearest the shaft's middle, by how
        far the shaft lies outside each (mean positive signed distance of the
        samples); fraction 0.
        """
        entry = np.asarray(entry, float)
        axis = np.asarray(axis, float)
        pts = _shaft_samples(entry, axis, float(length_mm), float(radius_mm))
        lab = self.label_at(pts)
        counts = {int(v): int(np.count_nonzero(lab == v)) for v in np.unique(lab) if int(v) in self.boxes}
        if counts:
            best = max(counts, key=lambda v: (counts[v], -v))
            return best, counts[best] / len(pts)
        mid = entry + 0.5 * float(length_mm) * axis
        near = sorted(self.centroids, key=lambda v: np.linalg.norm(self.centroids[v] - mid))[:2]
        if not near:
            return None, 0.0
        outside = {v: float(np.mean(np.maximum(self.vertebra(v).signed_distance_mm(pts), 0.0))) for v in near}
        return int(min(near, key=lambda v: outside[v])), 0.0

    def neighbours(self, label: int) -> tuple[int | None, int | None]:
        """(label of the vertebra above, label below) among those present, by name order."""
        idx = {v: level_index(n) for v, n in self.present.items()}
        me = idx[label]
        above = [v for v, i in idx.items() if i < me and me - i <= 2]
        below = [v for v, i in idx.items() if i > me and i - me <= 2]
        up = max(above, key=lambda v: idx[v]) if above else None
        down = min(below, key=lambda v: idx[v]) if below else None
        return up, down


@dataclass
class Vertebra:
    """One vertebra: resampled bone distance field, anatomical frame, pedicle centres.

    ``T_world_from_vertebra`` (4,4): columns x = patient right, y = anterior,
    z = superior (unit, world RAS), origin = body centre on the sagittal plane (mm).
    """

    anatomy: Anatomy
    label: int
    name: str = ""
    T_world_from_vertebra: np.ndarray = field(default=None, repr=False)
    pedicle_centres_mm: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        A = self.anatomy
        self.name = A.names[self.label]
        self._build_grid()
        self._build_frame()
        self._build_pedicles()
        self._build_canal()

    # -- grid and distance field
    def _build_grid(self):
        A = self.anatomy
        sl = A.boxes[self.label]
        margin = np.ceil(A.margin_mm / A.spacing[::-1]).astype(int)  # (k, j, i) voxels
        shape = A._arr.shape
        lo = [max(s.start - m, 0) for s, m in zip(sl, margin)]
        hi = [min(s.stop + m, n) for s, m, n in zip(sl, margin, shape)]
        crop = (A._arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == self.label).astype(np.float32)
        # Odd factors: no fine sample falls half-way between two label voxels, where the interpolated
        # indicator is exactly 0.5 and the ">= 0.5" rule would push the surface outwards.
        factors = [_odd_factor(sp / A.voxel_mm) for sp in A.spacing[::-1]]  # (k, j, i)
        fine = crop
        for ax, f in enumerate(factors):
            fine = _upsample_linear(fine, ax, f)
        mask = fine >= 0.5
        self._crop = (lo, hi, factors)
        # Grid index n along axis a sits at original index lo[a] + n / f[a].
        S = np.diag([1.0 / factors[2], 1.0 / factors[1], 1.0 / factors[0], 1.0])
        S[:3, 3] = [lo[2], lo[1], lo[0]]
        self.grid_ijk_to_ras = A.M @ S
        self.grid_ras_to_ijk = np.linalg.inv(self.grid_ijk_to_ras)
        self.grid_spacing = np.linalg.norm(self.grid_ijk_to_ras[:3, :3], axis=0)[::-1]  # (k, j, i) mm
        self.label_mask = mask
        # One signed distance of the label serves the frame, the symmetry search and the CT rim.
        self.label_sdf = _signed_distance(mask, self.grid_spacing)
        self.inside_depth = np.maximum(-self.label_sdf, 0.0)
        if A.bone == "ct":
            self.bone_mask = self._ct_bone(mask)
            self.sdf = _signed_distance(self.bone_mask, self.grid_spacing)
        else:
            self.bone_mask = mask
            self.sdf = self.label_sdf

    def _ct_bone(self, mask):
        """Label minus its rim voxels darker than cortex (``cortex_hu``) within ``rim_mm`` of its surface."""
        A = self.anatomy
        ct = A.ct
        same_grid = (np.shape(ct.array) == A._arr.shape
                     and np.allclose(np.asarray(ct.ijk_to_ras, float), A.M, atol=1e-4))
        if same_grid:
            # The usual case (labels made on the CT): crop and upsample the CT like the label.
            lo, hi, factors = self._crop
            hu = np.asarray(ct.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.float32)
            for ax, f in enumerate(factors):
                hu = _upsample_linear(hu, ax, f)
        else:
            kji = np.indices(mask.shape).reshape(3, -1).T  # grid (k, j, i)
            ras = _apply(self.grid_ijk_to_ras, kji[:, ::-1].astype(float))
            ijk = _apply(np.linalg.inv(np.asarray(ct.ijk_to_ras, float)), ras)
            hu = ndimage.map_coordinates(np.asarray(ct.array, np.float32), ijk[:, ::-1].T, order=1,
                                         mode="nearest").reshape(mask.shape)
        rim = mask & (self.inside_depth <= A.rim_mm)
        bone = mask & ~(rim & (hu < A.cortex_hu))
        # Keep the main piece: trimming can leave crumbs outside.
        lab, n = ndimage.label(bone)
        if n > 1:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            bone = sizes[lab] >= 0.02 * sizes.max()
        return bone

    def to_grid(self, ras_mm) -> np.ndarray:
        """RAS (N,3) → grid array coordinates (3, N) in (k, j, i) order."""
        ijk = _apply(self.grid_ras_to_ijk, np.atleast_2d(ras_mm))
        return ijk[:, ::-1].T

    def signed_distance_mm(self, ras_mm) -> np.ndarray:
        """Signed distance (mm) to the bone surface at RAS points (N,3): < 0 inside bone, > 0 outside.

        Beyond the resampled block (``margin_mm`` around the label), the value at its border plus
        the distance past the border (as planning.py does); beyond the label volume itself (a
        vertebra cut by the scan) just the border value: nothing is known there.
        """
        g = self.to_grid(ras_mm)
        d = ndimage.map_coordinates(self.sdf, g, order=1, mode="nearest")
        lo, hi, _ = self._crop
        shape = self.anatomy._arr.shape
        top = (np.array(self.sdf.shape, float) - 1.0)[:, None]
        below = np.maximum(0.0, -g) * np.array([lo[a] > 0 for a in range(3)], float)[:, None]
        above = np.maximum(0.0, g - top) * np.array([hi[a] < shape[a] for a in range(3)], float)[:, None]
        past = (below + above) * np.asarray(self.grid_spacing, float)[:, None]
        return d + np.linalg.norm(past, axis=0)

    def _grid_points_ras(self, mask, max_points=None, rng_seed=0):
        kji = np.argwhere(mask)
        if max_points is not None and len(kji) > max_points:
            rng = np.random.default_rng(rng_seed)
            kji = kji[rng.choice(len(kji), max_points, replace=False)]
        return _apply(self.grid_ijk_to_ras, kji[:, ::-1].astype(float))

    # -- frame
    def _build_frame(self):
        A = self.anatomy
        depth = self.inside_depth
        dmax = float(depth.max())
        if dmax <= 0:
            raise ValueError(f"vertebra {self.name}: label {self.label} is empty after resampling")
        core = depth >= 0.6 * dmax
        lab, n = ndimage.label(core)
        if n > 1:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            core = lab == int(np.argmax(sizes))
        core_pts = self._grid_points_ras(core, 20000)
        body_centre = core_pts.mean(axis=0)
        # Endplate normal: the body core is a disc (the body is lower than it is wide).
        evals, evecs = np.linalg.eigh(np.cov((core_pts - body_centre).T))
        pca_normal = evecs[:, 0]
        disc_like = evals[0] < 0.7 * evals[1]
        # Superior sign (and fallback axis) from the named neighbours.
        up, down = A.neighbours(self.label)
        me = A.centroids[self.label]
        if up is not None and down is not None:
            sup = A.centroids[up] - A.centroids[down]
        elif up is not None:
            sup = A.centroids[up] - me
        elif down is not None:
            sup = me - A.centroids[down]
        else:
            sup = np.array([0.0, 0.0, 1.0])  # a lone vertebra: assume the world's superior
        sup = sup / np.linalg.norm(sup)
        # A vertebra cut by the CT's field of view has a truncated body: trust the neighbours then.
        self.truncated = any(sl.start == 0 or sl.stop == size for sl, size in zip(A.boxes[self.label], A._arr.shape))
        use_pca = disc_like and not self.truncated and abs(pca_normal @ sup) > math.cos(math.radians(35))
        z = pca_normal if use_pca else sup
        z = z * np.sign(z @ sup)
        # Anterior: from the posterior elements (everything away from the body) to the body.
        body_region = ndimage.distance_transform_edt(~core, sampling=self.grid_spacing) <= 0.6 * dmax + 1.0
        post = self._grid_points_ras(self.label_mask & ~body_region, 20000)
        self.frame_quality = "anatomical"
        if len(post) >= 10:
            y = body_centre - post.mean(axis=0)
        else:  # no posterior elements in the label (cut by the scan): the world's anterior
            y = np.array([0.0, 1.0, 0.0])
            self.frame_quality = "fallback: no posterior elements in the label, world anterior used"
        if np.linalg.norm(y - (y @ z) * z) < 1e-6:
            y = np.cross(z, [1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.cross(z, [0.0, 1.0, 0.0])
        y = y - (y @ z) * z
        y /= np.linalg.norm(y)
        x = np.cross(y, z)
        # Refine the sagittal plane by mirror symmetry of the whole vertebra (turn about z, shift along x):
        # a coarse grid, then a fine one around its best.
        pts = self._grid_points_ras(self.label_mask, 3000, rng_seed=1) - body_centre
        best = (np.inf, 0.0, 0.0)
        for angles, offsets in ((np.arange(-20.0, 20.5, 2.0), np.arange(-5.0, 5.01, 1.0)),
                                (np.arange(-1.5, 1.6, 0.5), np.arange(-0.75, 0.76, 0.25))):
            base_ang, base_off = math.degrees(best[1]), best[2]
            for ang in np.deg2rad(base_ang + angles):
                xr = math.cos(ang) * x + math.sin(ang) * y
                px = pts @ xr
                for off in base_off + offsets:
                    mirrored = pts - 2.0 * (px - off)[:, None] * xr[None, :] + body_centre
                    score = float(np.mean(self._label_outside(mirrored)))
                    if score < best[0]:
                        best = (score, ang, off)
        _, ang, off = best
        x = math.cos(ang) * x + math.sin(ang) * y
        y = np.cross(z, x)
        origin = body_centre + off * x  # onto the symmetry plane
        T = np.eye(4)
        T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, origin
        self.T_world_from_vertebra = T
        self.body_depth_mm = dmax
        self.symmetry_mm = best[0]

    def _label_outside(self, ras_mm):
        """How far (mm) RAS points (N,3) are outside the vertebra's label (0 inside)."""
        d = ndimage.map_coordinates(self.label_sdf, self.to_grid(ras_mm), order=1, mode="nearest")
        return np.maximum(d, 0.0)

    def to_frame(self, ras_mm) -> np.ndarray:
        """RAS (N,3) → vertebra frame (N,3): (right, anterior, superior) mm from the body centre."""
        T = self.T_world_from_vertebra
        return (np.atleast_2d(ras_mm) - T[:3, 3]) @ T[:3, :3]

    def side_of(self, ras_mm) -> str:
        """"right" or "left" of the vertebra's sagittal plane."""
        return "right" if float(self.to_frame(ras_mm)[0, 0]) >= 0.0 else "left"

    # -- pedicles
    def _build_pedicles(self):
        """Pedicle isthmus centre per side: the narrowest coronal slab between body and posterior elements."""
        pts = self.to_frame(self._grid_points_ras(self.label_mask, 60000, rng_seed=2))
        core_r = 0.6 * self.body_depth_mm
        # The body's posterior wall: where the label in the midline stops, going back from the centre.
        mid = pts[(np.abs(pts[:, 0]) < 4.0) & (np.abs(pts[:, 2]) < core_r)]
        ys = np.sort(mid[:, 1])
        y_wall = 0.0
        if len(ys):
            # First gap (the canal) going posterior from the body centre.
            back = ys[ys <= 0.0][::-1]
            gaps = np.nonzero(np.diff(back) < -2.0)[0]
            y_wall = float(back[gaps[0]]) if len(gaps) else float(back[-1]) if len(back) else 0.0
        self.pedicle_wall_y_mm = y_wall
        self.pedicle_centres_mm = {}
        self.pedicle_profiles = {}
        for side, s in (("right", 1.0), ("left", -1.0)):
            lateral = pts[(s * pts[:, 0] > 3.0) & (s * pts[:, 0] < 40.0)]
            ys = np.arange(y_wall + 2.0, y_wall - 14.0, -1.0)
            slabs, areas = [], []
            for y0 in ys:
                slab = lateral[np.abs(lateral[:, 1] - y0) < 0.75]
                if len(slab) >= 5:
                    # Only the piece at the pedicle's height (drop transverse/articular processes far above/below).
                    slab = slab[np.abs(slab[:, 2] - np.median(slab[:, 2])) < 10.0]
                slabs.append(slab)
                areas.append(len(slab) if len(slab) >= 5 else np.inf)
            areas = np.asarray(areas, float)
            self.pedicle_profiles[side] = (ys, areas)
            if not np.any(np.isfinite(areas)):
                continue
            smooth = np.convolve(np.where(np.isfinite(areas), areas, areas[np.isfinite(areas)].max()),
                                 np.ones(3) / 3.0, mode="same")
            smooth[~np.isfinite(areas)] = np.inf
            i = int(np.argmin(smooth[1:-1])) + 1 if len(smooth) > 2 else int(np.argmin(smooth))
            c = slabs[i].mean(axis=0).copy()
            c[1] = ys[i]
            self.pedicle_centres_mm[side] = self.T_world_from_vertebra[:3, :3] @ c + self.T_world_from_vertebra[:3, 3]

    # -- spinal canal
    def _build_canal(self, step_mm: float = 0.75):
        """The vertebral foramen's axial footprint (frame x, y), from the label's holes in axial slices.

        The label is resampled on a grid of the vertebra frame; in each axial
        slice the holes of the label are filled; the holes that reach the
        midline behind the body are the canal. Its footprint is taken at the
        pedicles' height (above and below, the ring is open or widens into the
        foramina): a point "faces the canal" when its (x, y) is in it.
        """
        pts = self.to_frame(self._grid_points_ras(self.label_mask, 40000, rng_seed=3))
        lo = np.floor(pts.min(axis=0)) - 2.0
        hi = np.ceil(pts.max(axis=0)) + 2.0
        axes = [lo[a] + step_mm * np.arange(int((hi[a] - lo[a]) / step_mm) + 1) for a in range(3)]
        X, Y, Z = np.meshgrid(*axes, indexing="ij")
        frame = np.stack([X, Y, Z], axis=-1).reshape(-1, 3)
        T = self.T_world_from_vertebra
        world = frame @ T[:3, :3].T + T[:3, 3]
        inside = (ndimage.map_coordinates(self.label_sdf, self.to_grid(world), order=1, mode="nearest")
                  <= 0.0).reshape(X.shape)
        holes = np.zeros_like(inside)
        for iz in range(inside.shape[2]):
            sl = inside[:, :, iz]
            if sl.any():
                holes[:, :, iz] = ndimage.binary_fill_holes(sl) & ~sl
        lab, n = ndimage.label(holes)
        strip = (np.abs(X) < 3.0) & (Y < self.pedicle_wall_y_mm + 2.0)
        keep = [v for v in np.unique(lab[strip & holes]) if v > 0]
        canal = np.isin(lab, keep)
        # The footprint at the pedicles' mid-height, where the canal's lateral walls are the pedicles'
        # medial walls (above and below, the hole widens into the lateral recesses and foramina,
        # which a cranial or caudal breach reaches without entering the canal).
        peds = [self.to_frame(c)[0, 2] for c in self.pedicle_centres_mm.values()]
        mid = (np.abs(axes[2] - np.mean(peds)) <= 2.5) if peds else np.ones(len(axes[2]), bool)
        self.canal_xy = canal[:, :, mid].any(axis=2) if canal[:, :, mid].any() else canal.any(axis=2)
        self._canal_lo, self._canal_step = lo, step_mm
        self._canal_depth = np.maximum(-_signed_distance(self.canal_xy, (step_mm, step_mm)), 0.0)
        self._z_range = (float(pts[:, 2].min()), float(pts[:, 2].max()))

    def canal_depth_mm(self, ras_mm) -> np.ndarray:
        """How far (mm) RAS points (N,3) lie inside the canal's axial footprint (0 outside it, or
        more than 5 mm above / below the vertebra)."""
        f = self.to_frame(ras_mm)
        ij = ((f[:, :2] - self._canal_lo[:2]) / self._canal_step).T
        depth = ndimage.map_coordinates(self._canal_depth, ij, order=1, mode="constant", cval=0.0)
        level = (f[:, 2] > self._z_range[0] - 5.0) & (f[:, 2] < self._z_range[1] + 5.0)
        return np.where(level, depth, 0.0)

    # -- breach
    def breach(self, entry, axis, length_mm, radius_mm, side) -> dict:
        """Signed/max breach (mm), direction of the worst point, per-direction maxima."""
        pts, normals = _envelope(np.asarray(entry, float), np.asarray(axis, float), float(length_mm), float(radius_mm))
        d = self.signed_distance_mm(pts)
        signed = float(d.max())
        # Envelope points beyond the label volume's extent: nothing is known there (a vertebra cut by
        # the scan's field of view); the distance field just continues the edge.
        A = self.anatomy
        ijk = A._ras_to_ijk(pts)
        n = np.array(A._arr.shape[::-1], float)
        beyond = float(np.mean(np.any((ijk < -0.5) | (ijk > n - 0.5), axis=1)))
        R = self.T_world_from_vertebra[:3, :3]
        n_frame = normals @ R  # (right, anterior, superior) components
        s = 1.0 if side == "right" else -1.0
        names = np.array(["lateral", "medial", "anterior", "posterior", "cranial", "caudal"])
        comp = np.stack([s * n_frame[:, 0], -s * n_frame[:, 0], n_frame[:, 1], -n_frame[:, 1],
                         n_frame[:, 2], -n_frame[:, 2]], axis=1)
        which = names[np.argmax(comp, axis=1)]
        out_dirs = {}
        for name in names:
            sel = (which == name) & (d > CONTAINED_TOLERANCE_MM)
            if np.any(sel):
                out_dirs[str(name)] = float(d[sel].max())
        breach = max(signed, 0.0)
        direction = None
        if breach > CONTAINED_TOLERANCE_MM:
            # Where the screw is out: the outward normals of its envelope averaged over the points
            # outside, weighted by how far out (squared) - robust when a screw is out on several
            # sides at once (e.g. in the canal), where the single worst point is arbitrary.
            w = np.maximum(d - CONTAINED_TOLERANCE_MM, 0.0) ** 2
            mean_dir = (w[:, None] * comp).sum(axis=0)
            direction = str(names[int(np.argmax(mean_dir))])
        # Into the spinal canal: how far the outer surface is out of bone where it faces the canal.
        out_pts = d > CONTAINED_TOLERANCE_MM
        if self.canal_xy.any():
            # A point counts by the lesser of how far it is out of bone and how far it is into the
            # canal's footprint: a screw leaving its pedicle up or down next to the canal's wall
            # is out of bone, but not in the canal.
            into = np.minimum(d, self.canal_depth_mm(pts))
            canal_mm = float(into[out_pts].max()) if out_pts.any() else 0.0
        else:  # no canal found in the label: the medially facing points stand in for it
            canal_mm = out_dirs.get("medial", 0.0)
        return {"max_mm": breach, "signed_mm": signed, "direction": direction, "directions_mm": out_dirs,
                "canal_mm": canal_mm,
                "beyond_scan_fraction": beyond}

    # -- trajectory
    def trajectory(self, entry, tip, side) -> dict:
        """Transverse (medial, + = converging to the midline) and sagittal (+ = cranial) angles, degrees;
        offset (mm) of the screw axis from the pedicle centre where it crosses the pedicle's coronal plane."""
        e, t = self.to_frame(np.stack([entry, tip]))
        d = (t - e) / np.linalg.norm(t - e)
        s = 1.0 if side == "right" else -1.0
        out = {
            "transverse_angle_deg": round(math.degrees(math.atan2(-s * d[0], d[1])), 2),
            "sagittal_angle_deg": round(math.degrees(math.atan2(d[2], math.hypot(d[0], d[1]))), 2),
            "entry_offset_mm": None,
            "pedicle_offset_mm": None,
        }
        c = self.pedicle_centres_mm.get(side)
        if c is not None and abs(d[1]) > 0.2:
            cf = self.to_frame(c)[0]
            q = e + (cf[1] - e[1]) / d[1] * d
            lat, cra = s * (q[0] - cf[0]), q[2] - cf[2]
            out["entry_offset_mm"] = round(math.hypot(lat, cra), 2)
            out["pedicle_offset_mm"] = {"lateral": round(float(lat), 2), "cranial": round(float(cra), 2)}
        return out


# ----------------------------------------------------------------------------- helpers
def _sigma_for(screw: dict, pose_sigma):
    if pose_sigma is not None:
        return float(pose_sigma)
    if screw.get("pose_sigma_mm") is not None:
        return float(screw["pose_sigma_mm"])
    return sigma_from_confidence(screw.get("confidence"))


def _vec3(v, where):
    try:
        a = np.asarray(v, float).reshape(-1)
    except (TypeError, ValueError):
        a = None
    if a is None or a.shape != (3,) or not np.all(np.isfinite(a)):
        raise ValueError(f"{where} must be 3 finite numbers (RAS mm), got {v!r}")
    return a


def _apply(M, pts):
    pts = np.asarray(pts, float)
    return pts @ M[:3, :3].T + M[:3, 3]


def _odd_factor(x: float) -> int:
    """The odd integer >= 1 nearest ``x``."""
    return max(1, 2 * int(round((float(x) - 1.0) / 2.0)) + 1)


def _upsample_linear(a: np.ndarray, axis: int, f: int) -> np.ndarray:
    """Linear upsampling by an integer factor along one axis: samples at n / f (n = 0 .. (N-1) f)."""
    if f == 1:
        return a
    n = a.shape[axis]
    x = np.arange((n - 1) * f + 1) / f
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (x - i0).astype(a.dtype)
    shape = [1] * a.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i1, axis=axis) * w


def _signed_distance(mask: np.ndarray, spacing) -> np.ndarray:
    """Signed distance (mm, float32) to the surface between voxel centres: < 0 inside ``mask``, > 0 outside.

    Outside: distance to the nearest inside voxel centre minus that voxel's
    half-extent towards the point; inside: minus (distance to the nearest
    outside voxel centre minus its half-extent). The half-extent of a voxel of
    sizes ``spacing`` along unit direction ``u`` is taken as the ellipsoid's,
    ``1 / sqrt(sum (2 u_a / h_a)^2)``: exactly half a voxel along each axis, so
    a surface half-way between thick slices is placed right.
    """
    spacing = np.asarray(spacing, float)
    if not mask.any():
        return np.full(mask.shape, 1e3, np.float32)
    if mask.all():
        return np.full(mask.shape, -1e3, np.float32)
    sd = np.empty(mask.shape, np.float32)
    for region, sign in ((~mask, 1.0), (mask, -1.0)):
        # Distances from the voxels of `region` to the nearest voxel of the other set.
        dist, idx = ndimage.distance_transform_edt(region, sampling=spacing, return_indices=True)
        sel = region
        pos = np.stack([np.nonzero(sel)[a] for a in range(mask.ndim)], axis=1)
        near = np.stack([idx[a][sel] for a in range(mask.ndim)], axis=1)
        vec = (pos - near) * spacing
        d = dist[sel]
        u = vec / np.maximum(d, 1e-9)[:, None]
        half = 1.0 / np.sqrt(np.sum((2.0 * u / spacing) ** 2, axis=1))
        sd[sel] = sign * (d - half)
    return sd


def _shaft_samples(entry, axis, length_mm, radius_mm) -> np.ndarray:
    """Points inside the shaft: the axis and a ring at half the radius, every 0.5 mm, world RAS."""
    z = np.arange(0.0, length_mm + 1e-9, 0.5)
    u, v = _perpendiculars(axis)
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    ring = 0.5 * radius_mm * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v)  # (8, 3)
    offsets = np.vstack([np.zeros((1, 3)), ring])
    return (entry + z[:, None, None] * axis + offsets[None, :, :]).reshape(-1, 3)


def _perpendiculars(axis):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    ref = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(a, ref)
    u /= np.linalg.norm(u)
    return u, np.cross(a, u)


def _envelope(entry, axis, length_mm, radius_mm, step_mm: float = 0.5, n_around: int = 32,
              start_mm: float | None = None):
    """Points (N,3) and outward unit normals (N,3) of the shaft's outer envelope, world RAS.

    The envelope is the cylinder of the outer radius from ``start_mm`` below
    the entry (default ``ENTRY_SKIP_MM``, at most half the length) to the
    start of the tip cone, then a cone to the tip point. The tip length is
    ``ScrewSpec.from_size``'s (0.6 diameters, 2.5-5 mm), the same proportions
    as screw.py's model.
    """
    a = axis / np.linalg.norm(axis)
    tl = float(np.clip(1.2 * radius_mm, 2.5, 5.0))
    tl = min(tl, 0.9 * length_mm)
    if start_mm is None:
        start_mm = min(ENTRY_SKIP_MM, 0.5 * length_mm)
    z = np.arange(float(start_mm), length_mm + 1e-9, step_mm)
    if z[-1] < length_mm:
        z = np.append(z, length_mm)
    r = radius_mm * np.clip((length_mm - z) / tl, 0.0, 1.0)
    u, v = _perpendiculars(a)
    ang = np.linspace(0, 2 * np.pi, n_around, endpoint=False)
    radial = np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v  # (A, 3)
    pts = entry + z[:, None, None] * a + r[:, None, None] * radial[None]
    on_cone = (z > length_mm - tl)[:, None, None]
    cone_n = (tl * radial[None] + radius_mm * a) / math.hypot(tl, radius_mm)
    normals = np.where(on_cone, cone_n, np.broadcast_to(radial[None], pts.shape))
    pts = pts.reshape(-1, 3)
    normals = normals.reshape(-1, 3)
    # The apex: one point, pointing along the axis.
    pts = np.vstack([pts, entry + length_mm * a])
    normals = np.vstack([normals, a])
    return pts, normals
