"""Screw axes searched from a head centre against the segmentation of every view.

The instance finder reads a screw's axis in each view from its shaft's pixels, and the pose
stage starts from the axis that the instances triangulate to.  Where a shaft runs into
another screw's shaft or into a wire the network took for one, that axis is wrong, and so is
the screw fitted from it (a head in the right place with a tip 10-40 mm off), or the screw is
not found at all.  A screw's head blob is the most reliable thing about it; from a head centre
in 3D, every direction a pedicle screw can take is scored at once by how much of the first
20 mm of its shaft every view shows as screw (the worst view's mean foreground probability).
That gives (:func:`alternatives`) a second opinion on every fitted screw, and
(:func:`estimates_from_heads`) screws for the head blobs that no fitted screw explains.
Which of two fits of one screw stays is decided by the fit to the images (``pipeline``).

Frames: world RAS mm; pixels ``(u, v)``.  No Slicer, no simulator.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import correspondence, geometry, pose

__all__ = ["direction_support", "best_direction", "alternatives", "estimates_from_heads"]

#: Shaft samples, mm from the head's centre along the axis: past the head of any design (half
#: a head height is 4-7 mm) and within the shortest catalogue shaft (25 mm).
SHAFT_SAMPLES_MM = np.linspace(7.0, 27.0, 11)
#: Directions searched: a Fibonacci sphere (about 3° apart), then a 0.5° grid of +-3° around
#: the best.
N_DIRECTIONS = 6000
FINE_STEP_DEG = 0.5
FINE_HALF_WIDTH_DEG = 3.0
#: Near its head, many directions are about as well supported as the right one: with the screw
#: level in an AP and a lateral view both images are near horizontal lines whatever its medial
#: angle.  The right one runs on to one tip in every view.  Directions within RANK_WITHIN of the
#: best support are ranked by support + RUN_WEIGHT_PER_MM x their joint run (:func:`_rank`).
RANK_WITHIN = 0.03
RUN_WEIGHT_PER_MM = 0.002
#: A fitted screw gets an alternative when the best direction from its head is further than
#: this from its axis and better supported by at least :data:`ALTERNATIVE_MIN_GAIN`.
#: Chosen on 20 tuning cases (seeds bench_pose.TUNING_SEED_BASE + i, not the test set; shipped
#: network, AP + lateral) with a first version that ranked directions by support alone: gains
#: 0.08 / 0.15 / 0.25 gave recall 0.825 / 0.825 / 0.820 and precision 0.917 / 0.907 / 0.896
#: (without the second look: 0.800 / 0.889).
ALTERNATIVE_MIN_DEG = 8.0
ALTERNATIVE_MIN_GAIN = 0.1
#: A head blob that no fitted screw explains becomes a screw when a direction from its
#: triangulated centre has at least this support in every view that sees it (at least two).
MIN_HEAD_SUPPORT = 0.65
#: Head points of two views triangulate to one head when both reproject within this (mm at
#: the screw), as in correspondence.match_instances' gate.
HEAD_GATE_MM = 6.0


def _unit_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0 ** 0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)


_SPHERE = _unit_sphere(N_DIRECTIONS)


class _Maps:
    """Per view: normalised projection matrix, foreground probability and exposed field."""

    def __init__(self, views, probabilities, fields=None):
        self.views = list(views)
        self.Ps = [np.asarray(v.P, float) / np.linalg.norm(np.asarray(v.P, float)[2, :3]) for v in views]
        self.fg = [1.0 - np.asarray(p[0], np.float32) for p in probabilities]
        fields = fields if fields is not None else [None] * len(self.views)
        self.fields = [None if f is None else np.asarray(f, bool) for f in fields]

    def sample(self, vi, points_mm) -> np.ndarray:
        """Foreground probability at the projections of ``points_mm`` (..., 3); NaN outside the
        image or the exposed field (a view says nothing there)."""
        pts = np.asarray(points_mm, float)
        uv = geometry.project(self.Ps[vi], pts.reshape(-1, 3)).reshape(pts.shape[:-1] + (2,))
        fg = self.fg[vi]
        h, w = fg.shape
        u = np.round(uv[..., 0])
        v = np.round(uv[..., 1])
        ok = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (v >= 0) & (u <= w - 1) & (v <= h - 1)
        ui = np.where(ok, u, 0).astype(int)
        vi_ = np.where(ok, v, 0).astype(int)
        if self.fields[vi] is not None:
            ok &= self.fields[vi][vi_, ui]
        out = fg[vi_, ui].astype(float)
        out[~ok] = np.nan
        return out


def _support(maps: _Maps, head_mm, directions) -> np.ndarray:
    """(M,) worst view's mean foreground along each direction's shaft samples; views where
    fewer than half the samples fall in the field are left out, and with fewer than two views
    left the support is -1 (nothing to triangulate)."""
    d = np.atleast_2d(np.asarray(directions, float))
    pts = np.asarray(head_mm, float)[None, None] + d[:, None, :] * SHAFT_SAMPLES_MM[None, :, None]
    worst = np.full(len(d), np.inf)
    n_views = np.zeros(len(d), int)
    for vi in range(len(maps.views)):
        vals = maps.sample(vi, pts)
        seen = np.isfinite(vals)
        enough = seen.sum(1) >= 0.5 * len(SHAFT_SAMPLES_MM)
        mean = np.where(seen, vals, 0.0).sum(1) / np.maximum(seen.sum(1), 1)
        worst = np.where(enough, np.minimum(worst, mean), worst)
        n_views += enough
    return np.where(n_views >= 2, worst, -1.0)


def direction_support(views, probabilities, head_mm, direction, fields=None) -> float:
    """Support of one axis direction from a head centre (see :func:`best_direction`)."""
    return float(_support(_Maps(views, probabilities, fields), head_mm, direction)[0])


def _joint_run_mm(maps: _Maps, head_mm, directions) -> np.ndarray:
    """(M,) how far (mm from the head centre) each direction's axis runs on foreground in every
    view at once: the last point of the shortest of the views' runs (1 mm steps up to 85 mm;
    gaps of up to 2 mm bridged; outside a view's field counts as on)."""
    d = np.atleast_2d(np.asarray(directions, float))
    s = np.arange(SHAFT_SAMPLES_MM[0], 86.0, 1.0)
    pts = np.asarray(head_mm, float)[None, None] + d[:, None, :] * s[None, :, None]
    run = np.full(len(d), np.inf)
    for vi in range(len(maps.views)):
        vals = maps.sample(vi, pts)
        on = ~(np.isfinite(vals) & (vals < 0.5))
        bridged = on.copy()
        bridged[:, 1:] |= on[:, :-1]
        bridged[:, :-1] |= on[:, 1:]
        run = np.minimum(run, np.cumprod(bridged, axis=1).sum(1))
    return s[0] + np.maximum(run - 1, 0)


def _rank(maps: _Maps, head_mm, directions, support=None):
    """(support, rank): a screw's axis is both supported near its head in every view and ends
    at one tip in all of them, so the right direction runs furthest on foreground in every view
    at once (a wrong one leaves some view's shaft early); rank = support + joint run / 100 mm."""
    if support is None:
        support = _support(maps, head_mm, directions)
    return support, support + RUN_WEIGHT_PER_MM * _joint_run_mm(maps, head_mm, directions)


def _best(maps: _Maps, head_mm, max_from_anterior_deg):
    cone = _SPHERE[_SPHERE @ pose.ANTERIOR >= np.cos(np.radians(max_from_anterior_deg))]
    s = _support(maps, head_mm, cone)
    near = s >= s.max() - RANK_WITHIN
    _, r = _rank(maps, head_mm, cone[near], s[near])
    d0 = cone[near][int(np.argmax(r))]
    e1 = np.cross(d0, [1.0, 0.0, 0.0])
    if np.linalg.norm(e1) < 1e-6:
        e1 = np.cross(d0, [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d0, e1)
    g = np.radians(np.arange(-FINE_HALF_WIDTH_DEG, FINE_HALF_WIDTH_DEG + 1e-9, FINE_STEP_DEG))
    a, b = (x.reshape(-1, 1) for x in np.meshgrid(g, g))
    fine = d0[None] + a * e1[None] + b * e2[None]
    fine /= np.linalg.norm(fine, axis=1, keepdims=True)
    s, r = _rank(maps, head_mm, fine)
    k = int(np.argmax(r))
    return fine[k], float(s[k]), float(r[k])


def best_direction(views, probabilities, head_mm, fields=None, max_from_anterior_deg: float = 70.0):
    """The axis direction (unit, world) from ``head_mm`` (a head's centre) whose first 20 mm of
    shaft (:data:`SHAFT_SAMPLES_MM`) every view shows most as screw, among directions within
    ``max_from_anterior_deg`` of anterior; returns ``(direction, support)``.  ``support``: the
    worst view's mean foreground probability there (0-1; -1 when fewer than two views see it)."""
    return _best(_Maps(views, probabilities, fields), head_mm, max_from_anterior_deg)[:2]


def _head_centre(e) -> np.ndarray:
    return np.asarray(e.entry_mm, float) - e.axis * e.head_height_mm / 2.0


def alternatives(views, probabilities, estimates, fields=None, max_from_anterior_deg: float = 70.0,
                 min_deg: float = ALTERNATIVE_MIN_DEG, min_gain: float = ALTERNATIVE_MIN_GAIN) -> list:
    """Per estimate: the same screw turned about its head centre to the best-supported
    direction (:func:`best_direction`), or None where that is within ``min_deg`` of its axis or
    not better supported by ``min_gain``."""
    maps = _Maps(views, probabilities, fields)
    out = []
    for e in estimates:
        head = _head_centre(e)
        d, _s, r = _best(maps, head, max_from_anterior_deg)
        r0 = float(_rank(maps, head, e.axis)[1][0])
        angle = np.degrees(np.arccos(np.clip(float(d @ e.axis), -1.0, 1.0)))
        if angle > min_deg and r >= r0 + min_gain:
            entry = head + d * e.head_height_mm / 2.0
            out.append(replace(e, entry_mm=entry, tip_mm=entry + d * e.length_mm, confidence=0.0))
        else:
            out.append(None)
    return out


def estimates_from_heads(views, probabilities, instances, estimates, fields=None, implants=None,
                         max_from_anterior_deg: float = 70.0, min_support: float = MIN_HEAD_SUPPORT) -> list:
    """New screw estimates for head blobs that none of ``estimates`` explains.

    ``instances[i]``: view ``i``'s instances (``instances.Instance``); a head blob is explained
    when some estimate's head centre projects within its radius (6 px at least).  Each
    unexplained head is triangulated with every head blob of each other view (explained or not:
    in a lateral view one blob is often a left and a right head) whose pairing reprojects within
    :data:`HEAD_GATE_MM`; the pairing whose best direction is best supported is kept when its
    support reaches ``min_support``.  Length from how far the shaft runs in every view, diameter
    from the implant log (median) or the shaft's width; new screws that duplicate an estimate or
    each other are dropped.
    """
    maps = _Maps(views, probabilities, fields)
    known = [_head_centre(e) for e in estimates]
    cands = []
    for i, view_instances in enumerate(instances):
        explained = (geometry.project(maps.Ps[i], np.array(known)) if known else np.zeros((0, 2)))
        for a, inst in enumerate(view_instances):
            if not inst.has_head:
                continue
            if len(explained) and np.min(np.linalg.norm(explained - inst.head_end_px, axis=1)) <= max(
                    inst.head_radius_px, 6.0):
                continue
            best = None
            for j, other in enumerate(instances):
                if j == i:
                    continue
                for b, inst_b in enumerate(other):
                    if not inst_b.has_head:
                        continue
                    head = _triangulated_head(maps, (i, inst), (j, inst_b))
                    if head is None:
                        continue
                    d, s, r = _best(maps, head, max_from_anterior_deg)
                    if s >= min_support and (best is None or r > best[0]):
                        best = (r, head, d, {i: a, j: b})
            if best is not None:
                cands.append(best)
    log_d = [float(x["diameter_mm"]) for x in (implants or []) if "diameter_mm" in x]
    out = []
    for s, head, d, members in sorted(cands, key=lambda c: -c[0]):
        if log_d:
            diameter = float(np.median(log_d))
        else:
            (vi, ii), = list(members.items())[:1]
            inst = instances[vi][ii]
            diameter = float(np.clip(inst.width_px * correspondence.mm_per_px_at(views[vi], head), 4.0, 8.5))
        est = pose.estimate_from_head(head, d, head + d * _joint_run_mm(maps, head, d)[0], diameter,
                                      size_from_log=bool(log_d), members=members)
        if any(np.linalg.norm(head - _head_centre(e)) < 5.0 for e in list(estimates) + out):
            continue
        out.append(est)
    return out


def _triangulated_head(maps: _Maps, first, second):
    """Head centre (world) from two views' head points, or None when it fails the gate."""
    (i, inst_i), (j, inst_j) = first, second
    try:
        head = geometry.triangulate_points([maps.Ps[i], maps.Ps[j]], [inst_i.head_end_px, inst_j.head_end_px])
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not np.all(np.isfinite(head)):
        return None
    for vi, inst in ((i, inst_i), (j, inst_j)):
        if geometry.depth(maps.Ps[vi], head)[0] <= 0:
            return None
        err_px = np.linalg.norm(geometry.project(maps.Ps[vi], head) - inst.head_end_px)
        if err_px * correspondence.mm_per_px_at(maps.views[vi], head) > HEAD_GATE_MM:
            return None
    return head
