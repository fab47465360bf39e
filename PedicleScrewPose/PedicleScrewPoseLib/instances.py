"""Per-view screw instances from segmentation probabilities.

Input: one view's probabilities ``[3, v, u]`` (background, head, shaft).  Output: one
:class:`Instance` per screw seen, each a 2D axis segment from the head end to the far end
of the shaft, in pixels ``(u, v)``.

Touching and crossing screws are separated by geometry, not by connected components:
every screw has exactly one head, so head blobs are the seeds (blobs of two merged heads
are split at their distance-transform peaks); from each head the shaft is the direction
in which foreground runs on farthest without a gap inside a strip about one shaft wide
(a crossing shaft only adds a short stretch across the strip); the strip's pixels give
the axis (least squares through the head centre), the far end and the width.  Shaft
pixels that no head claims (a head outside the field, or missed) become head-less
instances fitted by principal axes.  A blob in which two screws lie on top of each other
(left and right screws in a lateral view) stays one instance: correspondence lets it
explain both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["Instance", "find_instances"]

#: A head blob must hold a disc of this radius (mm at the patient): a screw head is 10-13 mm
#: wide from any side, while a row of calibration beads, a K-wire or a lead that the network
#: calls head is a few millimetres thick.
MIN_HEAD_INSCRIBED_MM = 2.0


@dataclass
class Instance:
    """One screw seen in one view.  Pixels ``(u, v)``.

    ``entry_px``: where the head meets the visible shaft (the end of the head blob along the
    axis); ``head_px``: the head blob's centroid (projection of the head's centre, the point
    used to triangulate); ``tip_px``: far end of the shaft on the axis.  ``width_px``: shaft
    width.  ``visible_fraction``: how much of the shaft shows beyond the head (0 when the screw
    points along the ray), used to weigh this view's tip.  ``pixels``: (N,2) int (u, v) of the
    instance's mask, ``weights`` their foreground probabilities.
    """

    view_index: int
    entry_px: np.ndarray
    tip_px: np.ndarray
    width_px: float
    score: float
    head_px: np.ndarray | None = None
    has_head: bool = True
    head_radius_px: float = 0.0
    visible_fraction: float = 1.0
    pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), int), repr=False)
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def head_end_px(self) -> np.ndarray:
        """The point triangulated as the head's centre (the entry end when there is no head)."""
        return np.asarray(self.head_px if self.head_px is not None else self.entry_px, float)

    @property
    def length_px(self) -> float:
        return float(np.linalg.norm(np.asarray(self.tip_px) - self.head_end_px))

    @property
    def area_px(self) -> int:
        return int(len(self.pixels))


def find_instances(probabilities, view_index: int = 0, mm_per_px: float = 0.4,
                   threshold: float = 0.5) -> list[Instance]:
    """Split one view's probabilities ``[3, v, u]`` into screw instances.

    ``mm_per_px``: the pixel size at the patient (detector pitch over magnification), used
    to turn screw dimensions into pixel thresholds (a head blob is at least ~4 mm across, a
    head-less shaft at least 8 mm long).
    """
    p = np.asarray(probabilities, np.float32)
    if p.ndim != 3 or p.shape[0] != 3:
        raise ValueError(f"probabilities must be [3, v, u] (background, head, shaft), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinite values")
    head_p, shaft_p = p[1], p[2]
    fg_p = head_p + shaft_p
    fg = fg_p > threshold
    head = (head_p > threshold) | ((fg_p > threshold) & (head_p >= shaft_p) & (head_p > 0.3))
    head = ndimage.binary_opening(head, iterations=1) if head.sum() > 50 else head

    px_mm = 1.0 / max(mm_per_px, 1e-6)
    min_head_area = np.pi * (1.8 * px_mm) ** 2
    max_len_px = 85.0 * px_mm  # longest screw + head, mm

    seeds = _head_seeds(head, min_head_area, min_radius_px=MIN_HEAD_INSCRIBED_MM * px_mm)
    seed_id = np.zeros(head.shape, np.int32)
    for k, m in enumerate(seeds, start=1):
        seed_id[m] = k
    fg_v, fg_u = np.nonzero(fg)
    fg_uv = np.stack([fg_u, fg_v], 1).astype(float)
    fg_w = fg_p[fg_v, fg_u]
    head_flags = head[fg_v, fg_u]
    claimed = np.zeros(len(fg_uv), bool)
    instances: list[Instance] = []
    fg_seed = seed_id[fg_v, fg_u]
    for k, seed_mask in enumerate(seeds, start=1):
        other_head = (fg_seed != 0) & (fg_seed != k)
        inst, members = _instance_from_head(seed_mask, fg_uv, fg_w, head_flags, other_head, px_mm, max_len_px,
                                            view_index)
        if inst is not None:
            instances.append(inst)
            claimed |= members

    # Shaft pixels no head explains: head-less instances.
    rest = np.zeros_like(fg)
    rest[fg_v[~claimed], fg_u[~claimed]] = True
    rest &= ~ndimage.binary_dilation(head, iterations=2)
    lab, n = ndimage.label(rest)
    heads = [i for i in instances if i.has_head]
    for k in range(1, n + 1):
        vv, uu = np.nonzero(lab == k)
        inst = _headless_instance(uu, vv, fg_p[vv, uu], px_mm, view_index)
        if inst is None:
            continue
        # A shaft pointing back at a head whose blob holds two superimposed heads (left and
        # right screws in a lateral view): the shaft leaves that head's strip further on.
        owner = _pointing_head(inst, heads, max_len_px)
        if owner is not None:
            inst = _attach_head(inst, owner)
        instances.append(inst)
    return instances


def _pointing_head(inst, heads, max_len_px):
    """The head instance on the extension of a head-less shaft, behind its near end, if any."""
    best, best_d = None, np.inf
    p, q = np.asarray(inst.entry_px, float), np.asarray(inst.tip_px, float)
    d = (q - p) / max(np.linalg.norm(q - p), 1e-9)
    for h in heads:
        c = h.head_px
        for a, b, dd in ((p, q, d), (q, p, -d)):
            back = (a - c) @ dd  # distance from the head centre to the near end, along the shaft
            perp = abs((c - a) @ np.array([-dd[1], dd[0]]))
            far = (b - c) @ dd
            if back > -h.head_radius_px and far < max_len_px and perp < 0.8 * h.head_radius_px:
                score = perp + 0.01 * back
                if score < best_d:
                    best, best_d = (h, a, b), score
    return best


def _attach_head(inst, owner):
    h, near, far = owner
    c = h.head_px
    direction = (far - c) / max(np.linalg.norm(far - c), 1e-9)
    return Instance(
        view_index=inst.view_index,
        entry_px=c + direction * h.head_radius_px,
        tip_px=np.asarray(far, float),
        width_px=inst.width_px,
        score=inst.score * 2.0 * 0.9,
        head_px=c.copy(),
        has_head=True,
        head_radius_px=h.head_radius_px,
        visible_fraction=1.0,
        pixels=inst.pixels,
        weights=inst.weights,
    )


def _head_seeds(head: np.ndarray, min_area: float, min_radius_px: float = 0.0) -> list[np.ndarray]:
    """Head blobs, merged heads split at distance-transform peaks (one seed per head).
    Blobs thinner than ``2 * min_radius_px`` everywhere are no head."""
    lab, n = ndimage.label(head)
    seeds = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        blob = lab[sl] == k
        area = blob.sum()
        if area < min_area:
            continue
        dt = ndimage.distance_transform_edt(np.pad(blob, 1))[1:-1, 1:-1]
        r = dt.max()
        if r < min_radius_px:
            continue
        # Peaks of the distance transform at least one head radius apart, nearly as deep.
        size = max(3, int(2 * r * 0.9) | 1)
        peaks = (dt == ndimage.maximum_filter(dt, size=size)) & (dt > 0.7 * r)
        pv, pu = np.nonzero(peaks)
        pts = _cluster_points(np.stack([pu, pv], 1).astype(float), r)
        pts = _merge_without_neck(pts, dt)
        if len(pts) <= 1:
            full = np.zeros_like(head)
            full[sl] = blob
            seeds.append(full)
            continue
        vv, uu = np.nonzero(blob)
        d = np.linalg.norm(np.stack([uu, vv], 1)[:, None, :] - pts[None], axis=2)
        owner = d.argmin(1)
        for j in range(len(pts)):
            full = np.zeros_like(head)
            sel = owner == j
            if sel.sum() < min_area:
                continue
            full[sl][vv[sel], uu[sel]] = True
            seeds.append(full)
    return seeds


def _merge_without_neck(pts: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Keep two peaks apart only where the blob narrows between them (two touching heads);
    an elongated single head (a cylinder seen from the side) has no neck."""
    if len(pts) <= 1:
        return pts
    keep = [pts[0]]
    for p in pts[1:]:
        merged = False
        for q in keep:
            s = np.linspace(0, 1, 20)[:, None]
            line = q[None] * (1 - s) + p[None] * s
            vals = dt[np.clip(np.round(line[:, 1]).astype(int), 0, dt.shape[0] - 1),
                      np.clip(np.round(line[:, 0]).astype(int), 0, dt.shape[1] - 1)]
            ends = min(dt[int(p[1]), int(p[0])], dt[int(q[1]), int(q[0])])
            if vals.min() >= 0.75 * ends:
                merged = True
                break
        if not merged:
            keep.append(p)
    return np.array(keep)


def _cluster_points(pts: np.ndarray, radius: float) -> np.ndarray:
    """Merge points closer than ``radius`` (greedy), returning cluster centres."""
    centres: list[np.ndarray] = []
    for p in pts:
        for i, c in enumerate(centres):
            if np.linalg.norm(p - c) < radius:
                break
        else:
            centres.append(p)
    return np.array(centres)


def _instance_from_head(seed_mask, fg_uv, fg_w, head_flags, other_head, px_mm, max_len_px, view_index):
    """Follow the shaft from one head seed.  Returns (Instance, bool mask of claimed fg pixels)."""
    hv, hu = np.nonzero(seed_mask)
    centre = np.array([hu.mean(), hv.mean()])
    r_head = float(np.sqrt(len(hu) / np.pi))
    rel = fg_uv - centre
    dist = np.linalg.norm(rel, axis=1)
    near = dist < max_len_px
    rel_n = rel[near]
    shaft_only = ~head_flags[near]
    half_w = max(1.5, min(0.55 * r_head, 3.5 * px_mm))  # strip half width: about one shaft radius

    # Angular scan: for each direction, how far foreground runs on without a gap in a strip
    # of half width ``half_w``.  Done in polar bins: at radius rho the strip covers the angles
    # within asin(half_w / rho) of its direction, a box filter along the angle axis.
    step = np.deg2rad(2.0)
    A = int(round(2 * np.pi / step))
    angles = np.arange(A) * step
    dirs = np.stack([np.cos(angles), np.sin(angles)], 1)
    nbins = int(max_len_px) + 2
    rho = dist[near]
    phi = np.mod(np.arctan2(rel_n[:, 1], rel_n[:, 0]), 2 * np.pi)
    ab = np.floor(phi / step + 0.5).astype(int) % A
    rb = np.minimum(rho.astype(int), nbins - 1)
    hist = np.zeros((A, nbins))
    np.add.at(hist, (ab, rb), 1.0)
    other = other_head[near]
    hist_other = np.zeros((A, nbins))
    np.add.at(hist_other, (ab[other], rb[other]), 1.0)
    hist_shaft = np.zeros((A, nbins))
    np.add.at(hist_shaft, (ab[shaft_only], rb[shaft_only]), 1.0)
    win = np.ceil(np.arcsin(np.clip(half_w / (np.arange(nbins) + 0.5), 0, 1)) / step).astype(int)
    win = np.minimum(win, A // 2 - 1)

    def strip_counts(h):
        ext = np.concatenate([h, h, h], 0)
        cs = np.concatenate([np.zeros((1, nbins)), np.cumsum(ext, 0)], 0)
        a = np.arange(A)[:, None] + A
        hi = a + win[None, :] + 1
        lo = a - win[None, :]
        cols = np.arange(nbins)[None, :]
        return cs[hi, cols] - cs[lo, cols]

    counts = strip_counts(hist)
    occupied = counts >= max(1.0, 0.5 * half_w)
    gap = max(2, int(round(1.0 * px_mm)))
    occupied = ndimage.maximum_filter1d(occupied.astype(np.uint8), size=2 * gap + 1, axis=1) > 0
    start = int(max(1, round(0.5 * r_head)))
    # A run ends at another screw's head: each screw has one head, so a path through another
    # head is not this screw's shaft (a shaft that does pass over a head is cut there; its far
    # part becomes a head-less piece that is attached back to its head below).
    counts_other = strip_counts(hist_other)
    occupied &= counts_other < 0.5 * np.maximum(counts, 1.0)
    run = np.cumprod(occupied[:, start:], axis=1).sum(1)
    # A run that stops at another head is that head's shaft coming the other way (heads of
    # adjacent levels sit in a row in an AP view, each shaft reaching towards the next head):
    # it does not count, even where it is longer than this screw's own short, foreshortened one.
    ends_at_head = np.zeros(A, bool)
    if other.any():
        end_pts = (start + run)[:, None] * dirs                          # relative to the head centre
        d_other = cKDTree(rel_n[other]).query(end_pts)[0]
        ends_at_head = (d_other < gap + 0.5 * r_head) & (run > 0)
    # Prefer directions that leave the head through shaft (not head) pixels.
    shaft_counts = strip_counts(hist_shaft).sum(1)
    score_dir = np.where(ends_at_head, 0.0, run) + 1e-3 * shaft_counts
    # Smooth over neighbouring angles so a single lucky ray does not win.
    score_s = np.convolve(np.r_[score_dir[-2:], score_dir, score_dir[:2]], np.ones(5) / 5, "valid")
    best = int(np.argmax(score_s))
    direction = dirs[best]
    run_len = start + np.cumprod(occupied[best, start:]).sum()
    shaft_vis = max(0.0, run_len - r_head)

    # Refine the direction: least-squares line through the head centre and the strip's shaft pixels.
    for _ in range(2):
        al = rel_n @ direction
        pe = np.abs(rel_n @ np.array([-direction[1], direction[0]]))
        sel = (pe < half_w * 1.3) & (al > r_head * 0.8) & (al < run_len + gap)
        if sel.sum() < 5:
            break
        pts = rel_n[sel]
        w = fg_w[near][sel]
        Mx = (pts * w[:, None]).T @ pts
        evals, evecs = np.linalg.eigh(Mx)
        d_new = evecs[:, -1]
        if d_new @ direction < 0:
            d_new = -d_new
        direction = d_new / np.linalg.norm(d_new)

    al = rel_n @ direction
    pe = np.abs(rel_n @ np.array([-direction[1], direction[0]]))
    # Far end: last stretch of the strip with solid coverage (fringes of a blurred edge ignored).
    strip = (pe < half_w * 1.3) & (al > 0) & (al < run_len + gap + 2)
    hist = np.bincount(np.clip(al[strip], 0, None).astype(int), minlength=nbins)
    solid = np.nonzero(hist >= max(1.0, 0.5 * half_w))[0]
    far = float(solid.max()) + 0.5 if solid.size else r_head
    far = max(far, 0.0)
    # Width from the strip beyond the head: pixels per unit length in a wider strip.
    wide = (pe < half_w * 3.0) & (al > r_head * 1.2) & (al < far - 2) & shaft_only
    length_beyond = max(far - 2 - r_head * 1.2, 0.0)
    width = float(wide.sum() / length_beyond) if length_beyond > 3 else 0.0
    # Head end along the axis: the farthest head pixel of this seed in the axis strip.
    hal = (np.stack([hu, hv], 1) - centre) @ direction
    entry_d = float(hal.max()) if hal.size else 0.0

    # Claimed pixels: this seed plus the strip (pixels within the measured half width).
    claim_half = max(half_w * 1.3, 0.5 * width + 1.5)
    claim_local = (pe < claim_half) & (al > -r_head) & (al < far + 2)
    claimed = np.zeros(len(fg_uv), bool)
    idx = np.nonzero(near)[0]
    claimed[idx[claim_local]] = True
    seed_flat = seed_mask[fg_uv[:, 1].astype(int), fg_uv[:, 0].astype(int)]
    claimed |= seed_flat
    pix = fg_uv[claimed].astype(int)
    shaft_hidden = shaft_vis < 0.5 * r_head
    tip = centre + direction * far if not shaft_hidden else centre.copy()
    inst = Instance(
        view_index=view_index,
        entry_px=centre + direction * entry_d,
        tip_px=tip,
        width_px=width,
        score=float(np.clip(fg_w[claimed].mean(), 0, 1)),
        head_px=centre,
        has_head=True,
        head_radius_px=r_head,
        visible_fraction=float(np.clip(shaft_vis / (2.0 * r_head + 1e-6), 0.0, 1.0)),
        pixels=pix,
        weights=fg_w[claimed],
    )
    return inst, claimed


def _headless_instance(uu, vv, w, px_mm, view_index):
    """A shaft with no head: principal axis of the pixels; ends at the extremes."""
    if len(uu) < 5:
        return None
    pts = np.stack([uu, vv], 1).astype(float)
    c = (pts * w[:, None]).sum(0) / w.sum()
    rel = pts - c
    evals, evecs = np.linalg.eigh((rel * w[:, None]).T @ rel)
    d = evecs[:, -1]
    al = rel @ d
    length = al.max() - al.min()
    width = len(uu) / max(length, 1.0)
    if length < 8.0 * px_mm or length < 2.0 * width:
        return None  # a speck or a round blob: no shaft
    return Instance(
        view_index=view_index,
        entry_px=c + d * al.min(),
        tip_px=c + d * al.max(),
        width_px=float(width),
        score=float(np.clip(w.mean(), 0, 1)) * 0.5,
        head_px=None,
        has_head=False,
        head_radius_px=0.0,
        visible_fraction=1.0,
        pixels=pts.astype(int),
        weights=w,
    )
