"""Cross-view correspondence of screw instances.

Every pair of instances from two different views is a 3D hypothesis: its head centre is
triangulated from the two head points, its tip from the two shaft ends (both are point
correspondences, well conditioned even when the screw's image runs along an epipolar
line, as a screw's AP image nearly does for an AP/lateral pair).  The hypothesis is
reprojected into every view: its cost is the reprojection error of the head and the tip
in mm at the screw (px times the magnified pixel size), normalised by gates; in further
views it picks up the instance that fits it best, or must at least land on foreground.

Selection over all hypotheses is greedy by cost, hypotheses supported by more views first;
a hypothesis is taken while it explains an instance nothing explains yet, so one blob may
explain two screws that overlap in its view (a left and a right screw in a lateral view:
many-to-one), while the same screw is not found twice (3D duplicates are refused, and a
taken screw also explains the instances lying along its projection).
Instances that explain nothing are returned with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import geometry

__all__ = ["Match", "Unmatched", "match_instances", "scene_centre", "mm_per_px_at"]

REASON_OUTSIDE = "outside the other view's field"
REASON_SHORT = "too short"
REASON_AMBIGUOUS = "ambiguous"
REASON_NO_MATCH = "no epipolar match"


@dataclass
class Match:
    """One screw: ``members`` view index -> instance index; ``flipped`` view -> True where a
    head-less instance is used with its ends swapped.  ``head_mm``/``tip_mm``: triangulated
    head centre and tip (world RAS mm); ``cost``: normalised reprojection cost."""

    members: dict
    flipped: dict = field(default_factory=dict)
    head_only: frozenset = frozenset()  # views whose instance's far end is not used (merged blobs)
    head_mm: np.ndarray | None = None
    tip_mm: np.ndarray | None = None
    cost: float = np.inf


@dataclass
class Unmatched:
    view_index: int
    instance_index: int
    reason: str


#: A view vetoes a hypothesis only where its segmentation is confident there is no screw:
#: foreground probability below this.  The network misses faint screws (lateral views over
#: dense bone) with a foreground probability that is low but not nil: on 10 pose-bench cases,
#: 53% of missed screw pixels had 0.02 or more, against 3% of pixels far from any screw.  With
#: true (one-hot) label maps the threshold changes nothing.
VETO_FG = 0.02


def scene_centre(views) -> np.ndarray:
    """The world point closest (least squares) to all views' central rays: the isocentre."""
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for v in views:
        c = v.source_mm
        d = v.axis
        M = np.eye(3) - np.outer(d, d)
        A += M
        b += M @ c
    try:
        return np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        return np.mean([v.source_mm + v.axis * 0.6 * abs(v.K[0, 0]) for v in views], axis=0)


def mm_per_px_at(view, point_mm) -> float:
    """Pixel size (mm) at a world point: its depth from the source over the focal length (px)."""
    P = np.asarray(view.P, float)
    P = P / np.linalg.norm(P[2, :3])
    return float(geometry.depth(P, point_mm)[0]) / abs(view.K[0, 0])


def match_instances(views, instances, probabilities=None, gate_head_mm: float = 6.0,
                    gate_tip_mm: float = 12.0, duplicate_mm: float = 5.0, fields=None, axis_prior=None):
    """Match instances across views.  Returns ``(matches, unmatched)``.

    ``instances[i]``: list of ``instances.Instance`` of view ``i``; ``probabilities[i]``
    (optional, [3,v,u]) lets every view veto a hypothesis whose projected axis runs over
    background there (a foreshortened screw paired the wrong way round points out of its own
    shaft); ``fields[i]`` (optional bool [v,u]: the exposed field) keeps the unexposed surround
    from counting as background.  ``axis_prior``: optional ``(direction, max_deg)`` (world):
    hypotheses whose triangulated axis line is further than ``max_deg`` from ``direction``
    (either way round, since a head end may have been read at the wrong end) are refused,
    so that a pairing no screw can have does not use up the instances of the right one.
    """
    nv = len(views)
    if nv < 2:
        raise ValueError(f"need at least two views to match screws, got {nv}")
    centre = scene_centre(views)
    fg = None
    if probabilities is not None:
        fg = [1.0 - np.asarray(p[0], np.float32) for p in probabilities]
    ctx = _Context(views, instances, fg, centre, gate_head_mm, gate_tip_mm, fields, axis_prior)

    hyps: list[Match] = []
    candidates_of: dict = {}
    for i in range(nv):
        for j in range(i + 1, nv):
            for a, ia in enumerate(instances[i]):
                for b, ib in enumerate(instances[j]):
                    best = None
                    for fa in ([False] if ia.has_head else [False, True]):
                        for fb in ([False] if ib.has_head else [False, True]):
                            h = ctx.evaluate({i: a, j: b}, {i: fa, j: fb})
                            if h is not None and (best is None or h.cost < best.cost):
                                best = h
                    if best is None:
                        continue
                    best = ctx.extend(best)
                    if best is None:
                        continue
                    hyps.append(best)
                    for key in best.members.items():
                        candidates_of.setdefault(key, []).append(best)

    accepted: list[Match] = []
    used: set = set()

    def is_duplicate(h):
        for g in accepted:
            if (np.linalg.norm(g.head_mm - h.head_mm) < duplicate_mm and
                    np.linalg.norm(g.tip_mm - h.tip_mm) < 2 * duplicate_mm):
                return True
        return False

    # Greedy selection by cost, hypotheses seen in more views first (head-less instances
    # count as costlier).  A hypothesis is taken while it explains an instance nothing
    # explains yet; when taken, it also explains every instance of any view lying along its
    # projection (pieces of its own shaft, or a screw superimposed on it there).  So one
    # blob can explain two screws (many-to-one) without the same screw being found twice.
    def order(h):
        n_headless = sum(not instances[v][k].has_head for v, k in h.members.items())
        return (-len(h.members), h.cost + 0.5 * n_headless)

    for h in sorted(hyps, key=order):
        keys = set(h.members.items())
        if not (keys - used) or is_duplicate(h):
            continue
        accepted.append(h)
        used |= keys
        used |= ctx.covered_by(h)
    unmatched = []
    for vi in range(nv):
        for k, inst in enumerate(instances[vi]):
            if (vi, k) in used:
                continue
            unmatched.append(Unmatched(vi, k, ctx.reason(vi, k, candidates_of.get((vi, k), []))))
    return accepted, unmatched


class _Context:
    def __init__(self, views, instances, fg, centre, gate_head_mm, gate_tip_mm, fields=None, axis_prior=None):
        self.axis_prior = None
        if axis_prior is not None:
            d, max_deg = axis_prior
            d = np.asarray(d, float)
            self.axis_prior = (d / np.linalg.norm(d), float(np.cos(np.radians(max_deg))))
        self.fields = None if fields is None else [None if f is None else np.asarray(f, bool) for f in fields]
        self.views = views
        self.instances = instances
        self.fg = fg
        self.centre = centre
        self.gh = gate_head_mm
        self.gt = gate_tip_mm
        self.Ps = [np.asarray(v.P, float) / np.linalg.norm(np.asarray(v.P, float)[2, :3]) for v in views]
        self.mm_px = [mm_per_px_at(v, centre) for v in views]

    def _ends(self, vi, k, flipped):
        inst = self.instances[vi][k]
        h, t = inst.head_end_px, np.asarray(inst.tip_px, float)
        if flipped:
            h, t = t, h
        return h, t, inst

    def evaluate(self, members, flipped, head_only=frozenset()):
        """Triangulate a hypothesis from its members and score it; None when it fails a gate.

        Views in ``head_only`` give their head point; their instance's far end (which in a blob
        of two superimposed screws belongs to either) only has to lie on the axis line."""
        Ps, heads, tips, wts, tPs = [], [], [], [], []
        for vi, k in members.items():
            h, t, inst = self._ends(vi, k, flipped.get(vi, False))
            Ps.append(self.Ps[vi])
            heads.append(h)
            if vi not in head_only:
                tPs.append(self.Ps[vi])
                tips.append(t)
                wts.append(max(inst.visible_fraction, 0.05))
        if len(tPs) < 2:
            return None
        try:
            H = geometry.triangulate_points(Ps, heads)
            T = geometry.triangulate_points(tPs, tips, weights=wts)
        except (ValueError, np.linalg.LinAlgError):
            return None
        if not (np.all(np.isfinite(H)) and np.all(np.isfinite(T))):
            return None
        length = np.linalg.norm(T - H)
        if length > 85.0:  # longest catalogue screw (60 mm) plus half a head, with slack
            return None
        if self.axis_prior is not None and length > 1e-6:
            d, min_cos = self.axis_prior
            if abs(float((T - H) @ d)) / length < min_cos:
                return None  # no screw of this kind points that way
        if not self.supported(H, T):
            return None
        cost = 0.0
        for vi, k in members.items():
            P = self.Ps[vi]
            if geometry.depth(P, H)[0] <= 0 or geometry.depth(P, T)[0] <= 0:
                return None
            h, t, inst = self._ends(vi, k, flipped.get(vi, False))
            eh, et = self._errors(vi, H, T, h, t, inst, line_only=vi in head_only)
            if eh > self.gh or et > self.gt:
                return None
            cost += (eh / self.gh) ** 2 + (et / self.gt) ** 2
        return Match(members=dict(members), flipped=dict(flipped), head_mm=H, tip_mm=T,
                     cost=cost / len(members) + 0.1 * len(head_only), head_only=frozenset(head_only))

    def _errors(self, vi, H, T, h_px, t_px, inst, line_only=False):
        """Head and tip reprojection errors in mm at the screw (``line_only``: the tip's
        distance across the instance's axis line only)."""
        mm = mm_per_px_at(self.views[vi], H)
        ph = geometry.project(self.Ps[vi], H)
        pt = geometry.project(self.Ps[vi], T)
        eh = np.linalg.norm(ph - h_px) * mm
        seg = np.asarray(t_px, float) - np.asarray(h_px, float)
        n = np.linalg.norm(seg)
        if n > 2.0:
            # Across the axis counts fully; along it less: where a shaft runs on into another
            # screw's shaft the instance's far end is the least reliable thing about it.
            d = seg / n
            rel = pt - t_px
            et_px = np.hypot(rel @ np.array([-d[1], d[0]]), 0.3 * (rel @ d))
            if (pt - ph) @ d < 0 and inst.visible_fraction >= 0.25:
                et_px = max(et_px, np.linalg.norm(pt - t_px))  # pointing the wrong way: no leniency
            elif line_only:
                et_px = abs(rel @ np.array([-d[1], d[0]]))
        else:
            et_px = np.linalg.norm(pt - t_px)
        if inst.has_head and inst.visible_fraction < 0.25:
            # Shaft hidden behind the head here: the tip only has to project into the head blob.
            et_px = max(0.0, et_px - 1.5 * inst.head_radius_px)
        return eh, et_px * mm

    def supported(self, H, T, min_fraction: float = 0.5) -> bool:
        """False when, in some view, most of the projected axis lies on background.

        Samples between head and 85% of the length (the very tip is a thin cone) that fall
        outside the image or outside the exposed field say nothing.  A screw is opaque in every
        view it is in: a hypothesis whose axis crosses open background in one view is a wrong
        pairing (typically a screw seen end-on paired with its own mirror image)."""
        if self.fg is None:
            return True
        s = np.linspace(0.05, 0.85, 12)
        pts3 = H[None] * (1 - s[:, None]) + T[None] * s[:, None]
        for vi in range(len(self.views)):
            uv = geometry.project(self.Ps[vi], pts3)
            f = self.fg[vi]
            ui = np.round(uv[:, 0]).astype(int)
            vv = np.round(uv[:, 1]).astype(int)
            ok = (ui >= 0) & (vv >= 0) & (ui < f.shape[1]) & (vv < f.shape[0])
            if self.fields is not None and self.fields[vi] is not None:
                ok[ok] = self.fields[vi][vv[ok], ui[ok]]
            if ok.sum() < 4:
                continue
            if float(np.mean(f[vv[ok], ui[ok]] >= VETO_FG)) < min_fraction:
                return False
        return True

    def inside(self, vi, uv, margin=0.0):
        v = self.views[vi]
        return (margin <= uv[0] <= v.width - 1 - margin) and (margin <= uv[1] <= v.height - 1 - margin)

    def extend(self, h: Match):
        """Add the best-fitting instance of every other view; veto by background where none fits."""
        for vk in range(len(self.views)):
            if vk in h.members:
                continue
            best = None
            for c, inst in enumerate(self.instances[vk]):
                for fl in ([False] if inst.has_head else [False, True]):
                    members = dict(h.members)
                    members[vk] = c
                    flipped = dict(h.flipped)
                    flipped[vk] = fl
                    for ho in (h.head_only, h.head_only | {vk}):
                        g = self.evaluate(members, flipped, ho)
                        if g is not None and (best is None or g.cost < best.cost):
                            best = g
            if best is not None:
                h = best
                continue
            # No instance fits in this view: it must at least not contradict the foreground.
            ph = geometry.project(self.Ps[vk], h.head_mm)
            pt = geometry.project(self.Ps[vk], h.tip_mm)
            if self.fg is not None and self.inside(vk, ph) and self.inside(vk, pt):
                f = self.fg[vk]
                s = np.linspace(0.05, 0.85, 12)  # the very tip is a thin cone: stay inside
                pts = ph[None] * (1 - s[:, None]) + pt[None] * s[:, None]
                vals = f[np.clip(np.round(pts[:, 1]).astype(int), 0, f.shape[0] - 1),
                         np.clip(np.round(pts[:, 0]).astype(int), 0, f.shape[1] - 1)]
                # Both ends and most of the axis must not lie on confident background.
                seen = vals >= VETO_FG
                if seen.mean() < 0.6 or not seen[0] or not seen[-1]:
                    return None
            h.cost += 0.5  # seen in fewer views than it could be
        return h

    def covered_by(self, h: Match) -> set:
        """Instances (view, index) whose ends both lie on ``h``'s projection (within a head radius)."""
        out = set()
        for vi in range(len(self.views)):
            ph = geometry.project(self.Ps[vi], h.head_mm)
            pt = geometry.project(self.Ps[vi], h.tip_mm)
            seg = pt - ph
            n2 = max(float(seg @ seg), 1e-9)
            for k, inst in enumerate(self.instances[vi]):
                tol = max(inst.head_radius_px, 0.6 * inst.width_px, 3.0)
                ok = True
                for q in (inst.head_end_px, np.asarray(inst.tip_px, float)):
                    t = np.clip((q - ph) @ seg / n2, 0.0, 1.0)
                    if np.linalg.norm(q - ph - t * seg) > tol:
                        ok = False
                if ok:
                    out.add((vi, k))
        return out

    def reason(self, vi, k, candidates):
        inst = self.instances[vi][k]
        mm = self.mm_px[vi]
        if inst.length_px * mm < 6.0 and inst.area_px * mm * mm < 25.0:
            return REASON_SHORT
        # Outside every other view: the instance's head ray never enters another image.
        src, d = geometry.backproject(self.Ps[vi], inst.head_end_px)
        dist = np.linalg.norm(self.centre - src)
        ts = np.linspace(dist - 150.0, dist + 150.0, 31)
        pts = src[None] + ts[:, None] * d[None]
        any_inside = False
        for vj in range(len(self.views)):
            if vj == vi:
                continue
            uv = geometry.project(self.Ps[vj], pts)
            ok = [self.inside(vj, p) for p in uv]
            if any(ok):
                any_inside = True
        if not any_inside:
            return REASON_OUTSIDE
        if len(candidates) >= 2:
            return REASON_AMBIGUOUS
        if len(candidates) == 1:
            return REASON_AMBIGUOUS
        if not inst.has_head and inst.length_px * mm < 12.0:
            return REASON_SHORT
        return REASON_NO_MATCH
