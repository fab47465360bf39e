"""Screw poses in 3D: triangulation of matched instances, then joint 2D/3D refinement.

Frames and units: world RAS millimetres; pixels ``(u, v)`` (column, row), centres at
integers.  A screw is described by its ``entry_mm`` (where the shaft meets the head,
the origin of the screw frame) and ``tip_mm`` (``+z`` of the screw frame).

The refinement renders every screw's soft silhouette in every view (head and shaft
separately) and fits all screws at once to the segmentation probabilities.  The
silhouette is exact for flat-capped cylinders: a pixel's ray meets the cylinder of
radius ``r`` around the axis segment ``[z0, z1]`` when the ray passes within ``r`` of the
axis line and the stretch of the axis it passes over, ``z* ± sqrt(r^2 - d^2) |cot b|``
(``b`` the ray-axis angle), overlaps ``[z0, z1]``.  Sigmoids of those margins (in mm,
about 0.6 px wide at the screw's depth) make it differentiable.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import geometry

__all__ = [
    "ScrewEstimate",
    "spec_dimensions",
    "initial_poses",
    "estimate_from_head",
    "refine_poses",
    "render_labels",
    "render_screw_parts",
    "pose_matrix",
]


# --------------------------------------------------------------------------------------
# Screw shape used for rendering


def spec_dimensions(diameter_mm: float, length_mm: float) -> dict:
    """Silhouette dimensions (mm) of a screw of a given size.

    Uses ``screw.ScrewSpec.from_size`` when the screw module is there, so the fit uses the
    same proportions as the model; a private fallback with typical proportions otherwise.
    Keys: ``diameter_mm``, ``length_mm``, ``tip_length_mm``, ``head_diameter_mm``,
    ``head_height_mm``.
    """
    try:
        from .screw import ScrewSpec  # noqa: PLC0415

        spec = ScrewSpec.from_size(float(diameter_mm), float(length_mm))
        return {
            "diameter_mm": float(spec.diameter_mm),
            "length_mm": float(spec.length_mm),
            "tip_length_mm": float(spec.tip_length_mm),
            "head_diameter_mm": float(spec.head_diameter_mm),
            "head_height_mm": float(spec.head_height_mm),
        }
    except (ImportError, AttributeError):  # fallback while screw.py is missing
        d = float(diameter_mm)
        return {
            "diameter_mm": d,
            "length_mm": float(length_mm),
            "tip_length_mm": 0.9 * d,
            "head_diameter_mm": 10.5,
            "head_height_mm": 12.0,
        }


@dataclass
class ScrewEstimate:
    """One screw's pose and size.  ``entry_mm``/``tip_mm`` in world RAS mm."""

    entry_mm: np.ndarray
    tip_mm: np.ndarray
    diameter_mm: float
    length_mm: float
    head_diameter_mm: float
    head_height_mm: float
    tip_length_mm: float
    confidence: float = 0.0
    size_from_log: bool = False
    members: dict = field(default_factory=dict)  # view index -> instance index
    view_confidence: list = field(default_factory=list)

    @property
    def axis(self) -> np.ndarray:
        d = np.asarray(self.tip_mm, float) - np.asarray(self.entry_mm, float)
        return d / max(np.linalg.norm(d), 1e-9)

    def with_size(self, diameter_mm: float, length_mm: float) -> "ScrewEstimate":
        """This screw with another shaft size (the entry and axis stay).  The head keeps the
        size it has and the tip its length per diameter: both are measured from the images
        (:func:`refine_poses`), since screw systems differ in their heads and tips far more
        than in the sizes of their shafts."""
        dims = spec_dimensions(diameter_mm, length_mm)
        tip = np.asarray(self.entry_mm, float) + self.axis * dims["length_mm"]
        tip_per_diameter = self.tip_length_mm / max(self.diameter_mm, 1e-6)
        return replace(
            self,
            tip_mm=tip,
            diameter_mm=dims["diameter_mm"],
            length_mm=dims["length_mm"],
            tip_length_mm=float(min(tip_per_diameter * dims["diameter_mm"], 0.5 * dims["length_mm"])),
        )


def pose_matrix(entry_mm, tip_mm) -> np.ndarray:
    """4x4 ``T_world_from_screw``: origin at entry, +z to tip (roll 0, as screw.py's convention)."""
    try:
        from .screw import pose_from_entry_tip  # noqa: PLC0415

        return np.asarray(pose_from_entry_tip(np.asarray(entry_mm, float), np.asarray(tip_mm, float)), float)
    except ImportError:  # fallback while screw.py is missing
        e = np.asarray(entry_mm, float)
        z = np.asarray(tip_mm, float) - e
        z /= np.linalg.norm(z)
        ref = np.array([1.0, 0, 0]) if abs(z[0]) < 0.9 else np.array([0, 1.0, 0])
        x = ref - (ref @ z) * z
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        T = np.eye(4)
        T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, e
        return T


@contextlib.contextmanager
def single_thread(device):
    """Run small torch ops on one CPU thread: tensors of ~1e5 elements gain nothing from more,
    and on a busy machine inter-thread waits made them 20x slower (measured)."""
    if torch.device(device).type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------
# Initial poses


def _mm_per_px(view: geometry.View, point_mm) -> float:
    return float(geometry.depth(view.P / np.linalg.norm(view.P[2, :3]), point_mm)[0]) / abs(view.K[0, 0])


#: World RAS direction in which a pedicle screw points from head to tip (posterior approach).
ANTERIOR = np.array([0.0, 1.0, 0.0])
#: World RAS direction towards the head.
SUPERIOR = np.array([0.0, 0.0, 1.0])


def posterior_pointing(axis_head_to_tip) -> bool:
    """Whether a head-to-tip direction (world RAS) points backwards, out of the patient's back:
    no pedicle screw does (all 314 of the pose benchmark's screws point 36° or less from
    anterior, as pedicle trajectories do)."""
    return float(np.asarray(axis_head_to_tip, float) @ ANTERIOR) < 0.0


def initial_poses(views, instances, matches, implants=None) -> list[ScrewEstimate]:
    """Triangulate each matched screw from all its views.

    ``instances[i]``: the instances of view ``i``; ``matches``: ``correspondence.Match``
    objects (``members`` view -> instance index, with ``flipped`` ends where the head end was
    unknown).  The head centre is triangulated from the head-blob centroids, the tip from the
    far ends of the shafts (views where the shaft is hidden behind the head weigh little);
    the entry lies half a head height from the head centre along the axis.  Sizes come from
    the implant log when given (median diameter; lengths are assigned after refinement),
    else from the triangulated length and the shaft width in pixels.
    """
    estimates = []
    log_d = [float(s["diameter_mm"]) for s in (implants or []) if "diameter_mm" in s]
    log_l = [float(s["length_mm"]) for s in (implants or []) if "length_mm" in s]
    for m in matches:
        Ps, heads, tips, wts = [], [], [], []
        for vi, ii in m.members.items():
            inst = instances[vi][ii]
            head_px, tip_px = inst.head_end_px, inst.tip_px
            if getattr(m, "flipped", {}).get(vi, False):
                head_px, tip_px = tip_px, head_px
            Ps.append(views[vi].P)
            heads.append(head_px)
            tips.append(tip_px)
            wts.append(max(inst.visible_fraction, 0.05))
        head_c = geometry.triangulate_points(Ps, heads)
        tip = geometry.triangulate_points(Ps, tips, weights=wts)
        if posterior_pointing(tip - head_c):
            # A pedicle screw goes in from the back: its tip lies anterior of its head (world
            # RAS).  The head end was read at the wrong end of the shaft (a head blob the
            # network put at the tip); start from the other way round.
            head_c = geometry.triangulate_points(Ps, tips)
            tip = geometry.triangulate_points(Ps, heads)
        axis = tip - head_c
        n = np.linalg.norm(axis)
        if n < 1e-6:
            # Shaft hidden in every view: point the axis along the mean viewing direction.
            axis = np.mean([views[vi].axis for vi in m.members], axis=0)
            n = np.linalg.norm(axis)
        axis = axis / n
        if log_d:
            d0 = float(np.median(log_d))
        else:
            widths = []
            for vi, ii in m.members.items():
                inst = instances[vi][ii]
                if inst.width_px > 0:
                    widths.append(inst.width_px * _mm_per_px(views[vi], head_c))
            d0 = float(np.clip(np.median(widths) if widths else 6.0, 4.0, 8.5))
        estimates.append(estimate_from_head(head_c, axis, tip, d0, size_from_log=bool(log_d), members=m.members,
                                            fallback_length_mm=float(np.median(log_l)) if log_l else None))
    return estimates


def estimate_from_head(head_mm, axis, tip_mm, diameter_mm: float, size_from_log: bool = False, members=None,
                       fallback_length_mm: float | None = None) -> ScrewEstimate:
    """A screw of ``diameter_mm`` whose head's centre is ``head_mm`` and whose axis (unit,
    world) is ``axis``: the entry half a head height along it, the length to ``tip_mm``
    (``fallback_length_mm`` where that is not finite), within 20-70 mm."""
    dims = spec_dimensions(diameter_mm, 45.0)
    entry = head_mm + axis * dims["head_height_mm"] / 2.0
    length = float(np.linalg.norm(tip_mm - entry))
    if fallback_length_mm is not None and not np.isfinite(length):
        length = float(fallback_length_mm)
    length = float(np.clip(length, 20.0, 70.0))
    dims = spec_dimensions(diameter_mm, length)
    return ScrewEstimate(
        entry_mm=entry,
        tip_mm=entry + axis * length,
        diameter_mm=dims["diameter_mm"],
        length_mm=length,
        head_diameter_mm=dims["head_diameter_mm"],
        head_height_mm=dims["head_height_mm"],
        tip_length_mm=dims["tip_length_mm"],
        size_from_log=size_from_log,
        members=dict(members or {}),
    )


# --------------------------------------------------------------------------------------
# Differentiable silhouettes


def _axis_geometry(o, w, a, e):
    """For rays ``o + s w`` (``w`` unit, [M,3]) and axes ``a + z e`` (``e`` unit): the ray-axis
    distance ``d0``, the axis parameter ``zc`` of closest approach and ``|cot b|`` (b the angle
    between ray and axis), shared by all the cylinders of one screw."""
    r0 = o - a
    n = torch.cross(w, e, dim=-1)
    sin_b = n.norm(dim=-1).clamp_min(1e-6)
    cos_b = (w * e).sum(-1)
    d0 = (r0 * n).sum(-1).abs() / sin_b
    er0 = (e * r0).sum(-1)
    wr0 = (w * r0).sum(-1)
    s = (cos_b * er0 - wr0) / (sin_b * sin_b)
    zc = er0 + cos_b * s
    return d0, zc, cos_b.abs() / sin_b


def _cylinder(geo, z0, z1, r, sigma):
    """Soft occupancy of the flat-capped cylinder of radius ``r`` over axis ``[z0, z1]`` (mm):
    the ray meets it when ``d0 < r`` and ``[zc - h, zc + h]`` overlaps ``[z0, z1]`` with
    ``h = sqrt(r^2 - d0^2) |cot b|``."""
    d0, zc, cot = geo
    half = torch.sqrt((r * r - d0 * d0).clamp_min(0.0) + 1e-6) * cot
    return (torch.sigmoid((r - d0) / sigma) * torch.sigmoid((zc + half - z0) / sigma)
            * torch.sigmoid((z1 - zc + half) / sigma))


def render_screw_parts(o, w, entry, axis, length, diameter, head_d, head_h, tip_len, sigma):
    """Soft (head, shaft) occupancy of rays for screws given per ray (tensors, mm).

    The shaft is a cylinder of the outer diameter up to the start of the tip and a thinner
    cylinder (the cone's mean width) over the tip; the head a cylinder of the head diameter
    from ``z = -head_h`` to just above the entry, where a thin neck joins it to the shaft.
    """
    geo = _axis_geometry(o, w, entry, axis)
    zero = torch.zeros_like(length)
    tip_start = length - tip_len
    shaft = _cylinder(geo, zero, tip_start, diameter / 2, sigma)
    cone = _cylinder(geo, tip_start - 0.5 * sigma, length - 0.15 * tip_len, diameter * 0.3, sigma)
    shaft = 1 - (1 - shaft) * (1 - cone)
    # The tulip ends a little above the entry (screw.py: a gap of 0.12 head heights bridged
    # by a thin neck, which still counts as head).
    gap = 0.12 * head_h
    head = _cylinder(geo, -head_h, -gap, head_d / 2, sigma)
    neck = _cylinder(geo, -gap - 0.5 * sigma, zero, 0.3 * diameter, sigma)
    head = 1 - (1 - head) * (1 - neck)
    return head, shaft


class _ViewRays:
    """Pixel rays of one view: the source and unit directions of any pixels (torch)."""

    def __init__(self, view: geometry.View, device, dtype=torch.float32):
        P = np.asarray(view.P, float)
        P = P / np.linalg.norm(P[2, :3])
        self.Minv = torch.as_tensor(np.linalg.inv(P[:, :3]), dtype=dtype, device=device)
        self.source = torch.as_tensor(geometry.source_position(P), dtype=dtype, device=device)
        self.view = view
        self.device = device
        self.dtype = dtype

    def directions(self, u, v):
        h = torch.stack([u, v, torch.ones_like(u)], dim=-1).to(self.dtype)
        d = h @ self.Minv.T
        return d / d.norm(dim=-1, keepdim=True)


def _screw_box(view: geometry.View, est: ScrewEstimate, margin_px: float):
    """Pixel bounding box (u0, u1, v0, v1) inclusive, clipped to the image, or None."""
    axis = est.axis
    pts = [
        est.entry_mm - axis * est.head_height_mm,
        est.entry_mm,
        est.tip_mm,
    ]
    uv = geometry.project(view.P, np.asarray(pts))
    mm_px = _mm_per_px(view, est.entry_mm)
    pad = est.head_diameter_mm / 2 / mm_px + margin_px
    u0 = int(math.floor(uv[:, 0].min() - pad))
    u1 = int(math.ceil(uv[:, 0].max() + pad))
    v0 = int(math.floor(uv[:, 1].min() - pad))
    v1 = int(math.ceil(uv[:, 1].max() + pad))
    u0, v0 = max(u0, 0), max(v0, 0)
    u1, v1 = min(u1, view.width - 1), min(v1, view.height - 1)
    if u1 < u0 or v1 < v0:
        return None
    return u0, u1, v0, v1


def _band_pad(view, est, margin_px):
    return est.head_diameter_mm / 2 / _mm_per_px(view, est.entry_mm) + margin_px


def _band_distance(view, est, uu, vv):
    """Pixel distance of pixels (uu, vv) to the projected segment head top - tip."""
    ends = geometry.project(view.P, np.array([est.entry_mm - est.axis * est.head_height_mm, est.tip_mm]))
    p, q = ends
    d = q - p
    n2 = max(float(d @ d), 1e-9)
    t = np.clip(((uu - p[0]) * d[0] + (vv - p[1]) * d[1]) / n2, 0.0, 1.0)
    return np.hypot(uu - p[0] - t * d[0], vv - p[1] - t * d[1])


#: The refinement's schedules are written for pixels of about this size at the screws (mm; the
#: 512x512 pose-bench views have 0.26-0.41 mm, so nothing changes for them).  Views with pixels
#: several times finer (the same field on 1024 or 2048 pixels) are sampled every
#: ``round(WORK_MM_PER_PX / pixel)``-th pixel, with edge widths and margins scaled alike: the
#: fit sees the same millimetres for the cost of a 512 image.  8 simulated cases of 1024x1024
#: (86 screws, network, AP + lateral, 1 thread): refinement median 14-18 s -> 5-8 s; recall
#: 0.78 -> 0.76, precision 0.86 -> 0.83, segment error median 1.01 -> 1.12 mm (2 pairs of 86).
#: Scaling the coarse stages only (the last stage at full resolution) gave 0.76 / 0.83 /
#: 1.05 mm in 8-11 s.
WORK_MM_PER_PX = 0.3


def _pixel_scale(view, estimates, mm_px=None) -> int:
    """How many pixels of ``view`` make one of the refinement's working pixels (>= 1).
    ``mm_px``: the pixel size at each screw when already known."""
    if mm_px is None:
        mm_px = [_mm_per_px(view, e.entry_mm) for e in estimates]
    mm = float(np.median(mm_px))
    return max(1, int(round(WORK_MM_PER_PX / max(mm, 1e-6))))


class _Problem:
    """Pixels of every view near the current screws, with their rays and targets."""

    def __init__(self, views, rays, targets, estimates, stride, margin_px, device):
        self.per_view = []
        base_stride, base_margin = stride, margin_px
        for vi, view in enumerate(views):
            flat_sets, screw_of, pix_of = [], [], []
            W = view.width
            mm_px = [_mm_per_px(view, est.entry_mm) for est in estimates]
            scale = _pixel_scale(view, estimates, mm_px) if estimates else 1
            stride, margin_px = base_stride * scale, base_margin * scale
            for k, est in enumerate(estimates):
                box = _screw_box(view, est, margin_px)
                if box is None:
                    continue
                u0, u1, v0, v1 = box
                us = np.arange(u0 - u0 % stride, u1 + 1, stride)
                vs = np.arange(v0 - v0 % stride, v1 + 1, stride)
                us = us[us >= 0]
                vs = vs[vs >= 0]
                uu, vv = np.meshgrid(us, vs)
                # Keep the band around the projected axis (a slanted screw fills little of its box).
                band = _band_distance(view, est, uu, vv) <= _band_pad(view, est, margin_px)
                flat = (vv[band] * W + uu[band]).ravel()
                flat_sets.append(flat)
                screw_of.append(np.full(flat.size, k))
            if not flat_sets:
                self.per_view.append(None)
                continue
            all_flat = np.concatenate(flat_sets)
            union, inverse = np.unique(all_flat, return_inverse=True)
            screw_idx = np.concatenate(screw_of)
            u = torch.as_tensor(union % W, dtype=torch.float32, device=device)
            v = torch.as_tensor(union // W, dtype=torch.float32, device=device)
            dirs = rays[vi].directions(u, v)
            t = targets[vi]  # [2, H*W] (head, shaft)
            tgt = t[:, torch.as_tensor(union, device=device)]
            self.per_view.append(
                {
                    "union": union,
                    "dirs": dirs,
                    "pix": torch.as_tensor(inverse, device=device),
                    "screw": torch.as_tensor(screw_idx, device=device),
                    "target": tgt,
                    "norm": float(tgt.sum().item()) + 10.0,
                    "source": rays[vi].source,
                    # Edge widths are given in working pixels (see WORK_MM_PER_PX).
                    "mm_px": scale * torch.as_tensor(mm_px, dtype=torch.float32, device=device),
                }
            )


def _composite(pv, entry, axis, length, diam, head_d, head_h, tip_len, sigma_px):
    """Per-pixel (head, shaft) label probabilities of all screws composited, for one view."""
    k = pv["screw"]
    M = k.numel()
    o = pv["source"].expand(M, 3)
    w = pv["dirs"][pv["pix"]]
    sigma = sigma_px * pv["mm_px"][k]
    h, s = render_screw_parts(
        o, w, entry[k], axis[k], length[k], diam[k], head_d[k], head_h[k], tip_len[k], sigma
    )
    fg = 1 - (1 - h) * (1 - s)
    n = pv["union"].size
    log_not_h = torch.zeros(n, device=w.device).index_add(0, pv["pix"], torch.log1p(-h.clamp(max=1 - 1e-6)))
    log_not_f = torch.zeros(n, device=w.device).index_add(0, pv["pix"], torch.log1p(-fg.clamp(max=1 - 1e-6)))
    H = 1 - torch.exp(log_not_h)
    F = 1 - torch.exp(log_not_f)
    return H, (F - H).clamp_min(0.0), h, s


class _Adam:
    """Adam with a cosine-decaying step, by hand: ``torch.optim.Adam``'s first step costs ~2 s
    of lazy imports (measured), longer than the whole fit."""

    def __init__(self, groups, iterations, floor=0.05, betas=(0.9, 0.999), eps=1e-8):
        self.groups = groups
        self.m = [torch.zeros_like(p) for p, _ in groups]
        self.v = [torch.zeros_like(p) for p, _ in groups]
        self.t = 0
        self.T = max(int(iterations), 1)
        self.floor = floor
        self.b1, self.b2 = betas
        self.eps = eps

    def zero_grad(self):
        for p, _ in self.groups:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        scale = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(self.t - 1, self.T) / self.T))
        for (p, lr), m, v in zip(self.groups, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            mh = m / (1 - self.b1 ** self.t)
            vh = v / (1 - self.b2 ** self.t)
            p.sub_(lr * scale * mh / (vh.sqrt() + self.eps))


def _tangent_basis(axis):
    ref = np.where(np.abs(axis[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    t1 = ref - (ref * axis).sum(1, keepdims=True) * axis
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(axis, t1)
    return t1, t2


def _optimise(views, rays, targets, estimates, *, stride, sigma_px, iterations, margin_px,
              free_length, free_diameter, device, lr_mm=0.4, lr_rad=0.01,
              length_range=(20.0, 70.0), diameter_range=(3.5, 9.0), free_shape=None, shape_lr=0.01):
    """Adam on (entry shift, axis tilt, log length, log diameter, log head diameter, head
    height and tip length) of all screws jointly.  Head and tip (``free_shape``) are free with
    the length unless told otherwise; each screw's may move from where it starts, held there by
    :data:`HEAD_PRIOR_WEIGHT`, and all screws' together by one shared offset (the case's screw
    system, :data:`DESIGN_PRIOR_WEIGHT`)."""
    K = len(estimates)
    prob = _Problem(views, rays, targets, estimates, stride, margin_px, device)
    f32 = dict(dtype=torch.float32, device=device)
    entry0 = torch.as_tensor(np.array([e.entry_mm for e in estimates]), **f32)
    axis0_np = np.array([e.axis for e in estimates])
    t1_np, t2_np = _tangent_basis(axis0_np)
    axis0, t1, t2 = (torch.as_tensor(x, **f32) for x in (axis0_np, t1_np, t2_np))
    L0 = torch.as_tensor([e.length_mm for e in estimates], **f32)
    d0 = torch.as_tensor([e.diameter_mm for e in estimates], **f32)
    head_d = torch.as_tensor([e.head_diameter_mm for e in estimates], **f32)
    head_h = torch.as_tensor([e.head_height_mm for e in estimates], **f32)
    tip_ratio = torch.as_tensor([e.tip_length_mm / e.diameter_mm for e in estimates], **f32)

    d_entry = torch.zeros(K, 3, requires_grad=True, **f32)
    d_ang = torch.zeros(K, 2, requires_grad=True, **f32)
    d_logL = torch.zeros(K, requires_grad=True, **f32)
    d_logd = torch.zeros(K, requires_grad=True, **f32)
    # Per screw: log head diameter, log head height, log tip length.  Screw systems differ in
    # their heads and tips; a model with the wrong ones shifts the entry (the head-to-shaft
    # boundary) and tilts the axis.  One shared scale for all screws of a case was tried:
    # worse on our design (true labels, 10 cases: angle median 0.52 deg against 0.33).
    d_loghead = torch.zeros(K, 3, requires_grad=True, **f32)
    # The same offset for all screws: one case's screws come from one system, and its head and
    # tip can be far from the model's (a low-profile head of 0.6x our height, a tip of 1.7x our
    # length).  Held per screw alone, the sizes could not get there; the shared offset pools the
    # evidence of every screw.
    d_design = torch.zeros(3, requires_grad=True, **f32)
    free_shape = free_length if free_shape is None else free_shape
    groups = [(d_entry, lr_mm), (d_ang, lr_rad)]
    if free_length:
        groups.append((d_logL, 0.01))
    if free_shape:
        groups.append((d_loghead, shape_lr))
        if K > 1:
            groups.append((d_design, DESIGN_LR))
    if free_diameter:
        groups.append((d_logd, 0.01))
    opt = _Adam(groups, iterations, floor=0.05)

    def params():
        axis = axis0 + d_ang[:, :1] * t1 + d_ang[:, 1:] * t2
        axis = axis / axis.norm(dim=1, keepdim=True)
        entry = entry0 + d_entry
        # Sizes stay within what can be (the implant log's range when there is one): a screw
        # whose tip hides behind another could otherwise shrink and turn.
        L = (L0 * torch.exp(d_logL)).clamp(*length_range)
        d = (d0 * torch.exp(d_logd)).clamp(*diameter_range)
        log_shape = d_loghead + d_design
        hd = (head_d * torch.exp(log_shape[:, 0])).clamp(*HEAD_DIAMETER_RANGE_MM)
        hh = (head_h * torch.exp(log_shape[:, 1])).clamp(*HEAD_HEIGHT_RANGE_MM)
        tl = torch.minimum((tip_ratio * d * torch.exp(log_shape[:, 2])).clamp(min=1.5), 0.5 * L)
        return entry, axis, L, d, hd, hh, tl

    for _ in range(iterations):
        opt.zero_grad()
        entry, axis, L, d, hd, hh, tl = params()
        loss = 0.0
        for pv in prob.per_view:
            if pv is None:
                continue
            H, S, _, _ = _composite(pv, entry, axis, L, d, hd, hh, tl, sigma_px)
            err = (H - pv["target"][0]) ** 2 + (S - pv["target"][1]) ** 2
            loss = loss + err.sum() / pv["norm"]
        if not torch.is_tensor(loss):
            break
        if free_shape:
            loss = loss + HEAD_PRIOR_WEIGHT * (d_loghead ** 2).sum() + DESIGN_PRIOR_WEIGHT * (d_design ** 2).sum()
        loss.backward()
        opt.step()

    with torch.no_grad():
        entry, axis, L, d, hd, hh, tl = params()
        out = []
        for k, est in enumerate(estimates):
            dd = float(d[k]) if free_diameter else est.diameter_mm
            LL = float(L[k])
            e = entry[k].double().cpu().numpy()
            a = axis[k].double().cpu().numpy()
            out.append(
                replace(
                    est,
                    entry_mm=e,
                    tip_mm=e + a * LL,
                    length_mm=LL,
                    diameter_mm=dd,
                    tip_length_mm=float(tl[k]),
                    head_diameter_mm=float(hd[k]),
                    head_height_mm=float(hh[k]),
                )
            )
    return out


#: Ranges (mm) within which the refinement measures a screw's head: polyaxial tulips of
#: thoracolumbar systems are about 9-14 mm wide and 8-16 mm tall; monoaxial and low-profile
#: heads are smaller.
HEAD_DIAMETER_RANGE_MM = (7.0, 16.0)
HEAD_HEIGHT_RANGE_MM = (5.0, 18.0)
#: Weight of the pull of head and tip sizes towards the model's own (squared log ratios):
#: noisy network maps otherwise let them absorb segmentation errors.  10 cases each of our
#: design and of another (network, AP + lateral): segment error median 1.53 / 2.71 mm with
#: 0.05, 1.89 / 2.83 mm with none, 1.42 / 3.89 mm with the head and tip fixed.
HEAD_PRIOR_WEIGHT = 0.05
#: The shared (case-wide) head and tip offset of :func:`_optimise`: its Adam step and the weight
#: of its pull towards the model's proportions (squared log ratios, once per case).  A weak pull
#: (0.01) let it absorb the network's own biases on our design; at 0.4 it moves where the
#: screws agree.  See :data:`STAGES_SHAPE` for the measurements.
DESIGN_LR = 0.02
DESIGN_PRIOR_WEIGHT = 0.4


#: The silhouettes are fitted to the (head, shaft) probabilities raised to this power.  Faint
#: screws (a lateral view over dense bone) get probabilities of 0.1-0.5 along their whole
#: length; fitted to them as they are, a shorter screw that skips the faint part costs less
#: than the true one, and the log then hands it a short size.  The square root weighs weak
#: evidence nearer to strong.  30 pose-bench cases (network, AP + lateral, the same cached
#: probabilities for both): recall 0.704 -> 0.758, precision 0.863 -> 0.869, segment error
#: median 1.27 -> 1.25 mm (power 0.3: 0.755 / 0.837).  One-hot (true) label maps are unchanged.
TARGET_POWER = 0.5


def _targets(probabilities, device):
    out = []
    for p in probabilities:
        p = np.clip(np.asarray(p, np.float32)[1:3], 0.0, 1.0) ** TARGET_POWER
        out.append(torch.as_tensor(p.reshape(2, -1), device=device))
    return out


#: How far the free fit's sizes are trusted when the implant log's sizes are handed out (the
#: Hungarian cost: length and diameter differences over these).  On the network's maps the tip
#: fades over dense bone and edges blur, so the fit measures lengths short (30 pose cases, AP +
#: lateral: median 1.8 mm short, a quarter over 5.6 mm short) and diameters poorly (61% given
#: the right logged diameter): with the diameter weighted as if measured to 0.3 mm, it
#: decided the lengths, and 20% of the paired screws got a length 5-10 mm off (segment error
#: median 5.3 mm against 0.78 mm for the rest).  With 1.0 mm and the lengths read 1.5 mm longer:
#: 205 of 243 lengths right against 193 of 240 (cached maps; recall 0.764 -> 0.774, precision
#: 0.845 -> 0.856 there, but the benchmark rerun on fresh maps moved both within noise:
#: 0.761 / 0.860 -> 0.758 / 0.856, segment p95 6.7 -> 6.2 mm).  True label maps: unchanged
#: recall, p95 1.18 deg / 1.73 mm -> 1.03 deg / 1.43 mm.
LOG_LENGTH_SD_MM = 1.5
LOG_DIAMETER_SD_MM = 1.0
FIT_LENGTH_SHORTFALL_MM = 1.5


def _log_sizes(implants) -> list[tuple[float, float]]:
    """The implant log's complete entries as (diameter_mm, length_mm)."""
    return [(float(s["diameter_mm"]), float(s["length_mm"])) for s in implants or []
            if "diameter_mm" in s and "length_mm" in s]


def _assign_log_sizes(estimates, implants):
    """Give each screw an implant-log size: Hungarian on length (and diameter) differences."""
    log = _log_sizes(implants)
    if not log or not estimates:
        return estimates
    cost = np.array([[abs(e.length_mm + FIT_LENGTH_SHORTFALL_MM - L) / LOG_LENGTH_SD_MM
                      + abs(e.diameter_mm - d) / LOG_DIAMETER_SD_MM for d, L in log]
                     for e in estimates])
    rows, cols = linear_sum_assignment(cost)
    out = list(estimates)
    for r, c in zip(rows, cols):
        out[r] = out[r].with_size(*log[c])
        out[r].size_from_log = True
    # More screws found than logged: the nearest logged size.
    for r in set(range(len(estimates))) - set(rows):
        c = int(np.argmin(cost[r]))
        out[r] = out[r].with_size(*log[c])
        out[r].size_from_log = True
    return out


@torch.no_grad()
def _fit_loss(views, rays, targets, estimates, device, stride=2, sigma_px=0.8, margin_px=6, prob=None):
    """The refinement's loss for fixed screws (all views).  ``prob``: the pixels to compare on
    (a :class:`_Problem` whose screws' bands hold these screws; default: these screws' own)."""
    if prob is None:
        prob = _Problem(views, rays, targets, estimates, stride, margin_px, device)
    f32 = dict(dtype=torch.float32, device=device)
    args = [torch.as_tensor(np.array([getattr(e, k) if k != "axis" else e.axis for e in estimates]), **f32)
            for k in ("entry_mm", "axis", "length_mm", "diameter_mm", "head_diameter_mm", "head_height_mm",
                      "tip_length_mm")]
    total = 0.0
    for pv in prob.per_view:
        if pv is None:
            continue
        H, S, _, _ = _composite(pv, *args, sigma_px)
        total += float((((H - pv["target"][0]) ** 2 + (S - pv["target"][1]) ** 2).sum()) / pv["norm"])
    return total


def _swap_sizes(views, rays, targets, estimates, device, max_rounds=2, pool=()):
    """Swap the logged sizes of two screws where the images fit the swap better.

    Lengths measured by the free fit can be a few mm off where a tip hides behind another
    screw; the silhouettes with the logged sizes settle which screw got which size.
    Each screw keeps its entry and axis; only sizes move.  ``pool``: logged sizes that no
    screw holds (screws missed); a screw may trade its size for one of those too.  Tuning cases
    (40, cached maps): AP + lateral recall 0.751 -> 0.759, precision 0.882 -> 0.891; with the
    oblique 0.774 -> 0.779 and 0.942 -> 0.945.
    """
    est = list(estimates)
    pool = list(pool)
    if not est:
        return est
    # Every trial is scored on the same pixels: each screw's band at the longest and widest
    # size it could take.  Scored on its own bands (before session 23), a shorter screw left
    # the shaft evidence beyond its tip out of the sum and out of the norm, and each trial
    # built its pixels anew.  Tuning cases, cached network maps, AP + lateral: the tall-blunt
    # design (16) recall / precision 0.750 / 0.831 -> 0.787 / 0.860, segment median 1.82 ->
    # 1.61 mm; ours (20) unchanged, 0.840 / 0.918; low-profile (30) 0.789 / 0.900 -> 0.786 /
    # 0.893; pipeline time 8-21% less.
    sizes = [(e.diameter_mm, e.length_mm) for e in est] + pool
    d_max, L_max = max(d for d, _L in sizes), max(L for _d, L in sizes)
    prob = _Problem(views, rays, targets, [e.with_size(d_max, L_max) for e in est],
                    stride=2, margin_px=6, device=device)  # _fit_loss's own stride and margin

    def loss_of(trial):
        return _fit_loss(views, rays, targets, trial, device, prob=prob)

    base = loss_of(est)
    for _ in range(max_rounds):
        improved = False
        for i in range(len(est)):
            for j in range(i + 1, len(est)):
                a, b = est[i], est[j]
                if (a.diameter_mm, a.length_mm) == (b.diameter_mm, b.length_mm):
                    continue
                trial = list(est)
                trial[i] = a.with_size(b.diameter_mm, b.length_mm)
                trial[j] = b.with_size(a.diameter_mm, a.length_mm)
                trial[i].size_from_log = trial[j].size_from_log = True
                loss = loss_of(trial)
                if loss < base - 1e-4:
                    est, base, improved = trial, loss, True
        # Logged sizes no found screw holds (screws missed): trade with that pool too.
        # Each distinct size is tried once per screw, so a long log costs little more.
        for i in range(len(est)):
            for d, L in sorted(set(pool)):
                a = est[i]
                if (a.diameter_mm, a.length_mm) == (d, L) or (d, L) not in pool:
                    continue
                trial = list(est)
                trial[i] = a.with_size(d, L)
                trial[i].size_from_log = True
                loss = loss_of(trial)
                if loss < base - 1e-4:
                    pool[pool.index((d, L))] = (a.diameter_mm, a.length_mm)
                    est, base, improved = trial, loss, True
        if not improved:
            break
    return est


def _snap_to_catalogue(est: ScrewEstimate) -> ScrewEstimate:
    try:
        from .screw import catalogue  # noqa: PLC0415

        cat = catalogue()
    except (ImportError, AttributeError):
        return est
    if not cat:
        return est
    diams = sorted({float(s.diameter_mm) for s in cat})
    d = min(diams, key=lambda x: abs(x - est.diameter_mm))
    lengths = sorted({float(s.length_mm) for s in cat if float(s.diameter_mm) == d})
    L = min(lengths, key=lambda x: abs(x - est.length_mm)) if lengths else est.length_mm
    return est.with_size(d, L)


# Refinement schedule: (pixel stride, edge width px, iterations, band margin px, Adam step mm, rad).
# A wider first stage (every 4th pixel, 3 px edges, large steps) helped synthetic scenes
# but on simulated cases pushed left/right screws superimposed in the lateral view apart
# along the AP ray (median segment error 3.1 mm vs 0.24 mm without it, bench case000).
STAGES_FREE = ((2, 1.5, 40, 10, 0.6, 0.015), (2, 0.8, 25, 6, 0.2, 0.008))
# ... and on other cases it was the wide stage that pulled such screws out of each other's
# silhouettes (synthetic seed 1: 6.2 mm without, 0.3 mm with).  Both are local minima of one
# loss, and the true poses always had the lower loss (checked): so both schedules run and
# the better fit wins.
STAGES_WIDE = ((4, 3.0, 30, 16, 1.5, 0.04), (2, 1.5, 40, 10, 0.6, 0.015), (2, 0.8, 25, 6, 0.2, 0.008))
ALTERNATIVES = (STAGES_FREE, STAGES_WIDE)
STAGES_FIXED = ((1, 0.6, 15, 4, 0.1, 0.004),)
#: After the implant log's sizes are handed out: one stage with the shaft sizes fixed and the
#: heads and tips free (per screw and shared, :data:`DESIGN_LR`).  Before it, the last free
#: stage had fitted head and tip with the length free, and a head or tip of the wrong length
#: tilts the axis once the logged length is fixed: in an AP view, where a screw points nearly
#: along the ray, tilting it shortens its projection, which hides a tip drawn too long.  On
#: cases of another screw design (`bench_pose.py --screw-design low-profile`, tuning seeds
#: 97_000_000 + i, 30 cases, AP + lateral), fitted from the true pose with our model's head and
#: tip the axes tilted 1.4 deg (0.46 with the design's own).  Session 21 (HEAD_PRIOR_WEIGHT and
#: the rest unchanged), against the refinement without the shared offset and this stage:
#: true labels, 30 cases of the other design: recall 0.922 -> 0.938, precision 0.956 -> 0.973,
#: angle median 1.18 -> 0.79 deg, segment median 0.85 -> 0.63 mm (with a shared pull of 0.01:
#: 0.50 deg, 0.42 mm, but on our design's network maps recall 0.820 -> 0.790, precision
#: 0.916 -> 0.878); network, the same cases: recall 0.782 -> 0.789, precision 0.896 -> 0.897, angle median
#: 1.91 -> 1.67 deg, segment median 2.69 -> 2.04 mm (61% of the screws paired in both closer);
#: network, 20 tuning cases of our design: recall 0.820 -> 0.825, precision 0.916 -> 0.912,
#: angle median 1.09 -> 1.10 deg, segment median 0.90 -> 1.05 mm (58% of the screws further,
#: by a median of 0.04 mm): the price, on the design the model was drawn from, of not assuming it.
STAGES_SHAPE = ((2, 0.8, 25, 6, 0.2, 0.008),)
SHAPE_LR = 0.02


def refine_poses(views, probabilities, estimates, implants=None, device="cpu",
                 stages_free=None, stages_fixed=STAGES_FIXED, alternatives=ALTERNATIVES) -> list[ScrewEstimate]:
    """Fit all screws jointly to the (head, shaft) probabilities of all views (their square
    roots, :data:`TARGET_POWER`; fine pixels sampled at :data:`WORK_MM_PER_PX`).

    Coarse stages on every 2nd pixel with length, head size and tip length (and, without an
    implant log, diameter) free, head and tip held near the model's proportions per screw by
    :data:`HEAD_PRIOR_WEIGHT` and for the case's screw system as a whole by
    :data:`DESIGN_PRIOR_WEIGHT`; sizes then set from the implant log (Hungarian on length, then
    pairwise swaps) or snapped to the catalogue; a stage with the shaft sizes fixed and heads and
    tips free (:data:`STAGES_SHAPE`); a last stage at full resolution with 0.6 px edges and all
    sizes fixed.
    Confidence per screw: the worst view's silhouette agreement (see :func:`_confidences`).
    """
    if not estimates:
        return []
    torch_device = torch.device(device)
    with single_thread(torch_device):
        rays = [_ViewRays(v, torch_device) for v in views]
        targets = _targets(probabilities, torch_device)
        log_l = [float(s["length_mm"]) for s in (implants or []) if "length_mm" in s]
        has_log = bool(log_l)
        length_range = (min(log_l) - 2.0, max(log_l) + 2.0) if has_log else (20.0, 70.0)
        log_d = [float(s["diameter_mm"]) for s in (implants or []) if "diameter_mm" in s]
        diameter_range = (min(log_d) - 0.5, max(log_d) + 0.5) if log_d else (3.5, 9.0)
        start = [e.with_size(e.diameter_mm, float(np.clip(e.length_mm, *length_range))) for e in estimates]
        for e0, e1 in zip(estimates, start):
            e1.size_from_log = e0.size_from_log
        schedules = [stages_free] if stages_free is not None else list(alternatives)
        best, best_loss = None, np.inf
        for schedule in schedules:
            est = start
            for stride, sig, it, margin, lr_mm, lr_rad in schedule:
                est = _optimise(views, rays, targets, est, stride=stride, sigma_px=sig, iterations=it,
                                margin_px=margin, free_length=True, free_diameter=True, device=torch_device,
                                lr_mm=lr_mm, lr_rad=lr_rad, length_range=length_range,
                                diameter_range=diameter_range)
            est = _assign_log_sizes(est, implants) if has_log else [_snap_to_catalogue(e) for e in est]
            loss = _fit_loss(views, rays, targets, est, torch_device) if len(schedules) > 1 else 0.0
            if loss < best_loss:
                best, best_loss = est, loss
        est = best
        # Size swaps are tried once, on the winning schedule's fit (they cost K^2/2 fits of the
        # whole scene, and running them on both schedules made them a third of the
        # refinement).  Tuning cases (40, AP + lateral, cached maps): the same recall (0.751),
        # precision 0.885 -> 0.882 (one more false screw), 15% less pipeline time; with the
        # oblique, the same recall and precision (0.774 / 0.942), 12% less time.
        if has_log:
            unheld = Counter(_log_sizes(implants)) - Counter((e.diameter_mm, e.length_mm) for e in est)
            est = _swap_sizes(views, rays, targets, est, torch_device, pool=list(unheld.elements()))
        # Shaft sizes fixed from here: first heads and tips free (STAGES_SHAPE), then nothing.
        stages = [(st, True) for st in STAGES_SHAPE] + [(st, False) for st in stages_fixed]
        for (stride, sig, it, margin, lr_mm, lr_rad), free_shape in stages:
            est = _optimise(views, rays, targets, est, stride=stride, sigma_px=sig, iterations=it, margin_px=margin,
                            free_length=False, free_diameter=False, device=torch_device,
                            lr_mm=lr_mm, lr_rad=lr_rad, free_shape=free_shape, shape_lr=SHAPE_LR)
        return _confidences(views, rays, targets, est, torch_device)


def confidences(views, probabilities, estimates, device="cpu") -> list[ScrewEstimate]:
    """``estimates`` with ``confidence`` and ``view_confidence`` set from how their silhouettes
    agree with the (head, shaft) probabilities of each view (see :func:`_confidences`)."""
    if not estimates:
        return []
    torch_device = torch.device(device)
    with single_thread(torch_device):
        rays = [_ViewRays(v, torch_device) for v in views]
        return _confidences(views, rays, _targets(probabilities, torch_device), estimates, torch_device)


@torch.no_grad()
def _confidences(views, rays, targets, estimates, device):
    """Per screw and view: IoU of its rendered silhouette with the segmented foreground near it
    (pixels explained by other screws left out); the screw's confidence is the worst view's."""
    prob = _Problem(views, rays, targets, estimates, 1, 4, device)
    K = len(estimates)
    per_view = np.ones((K, len(views)))
    f32 = dict(dtype=torch.float32, device=device)
    entry = torch.as_tensor(np.array([e.entry_mm for e in estimates]), **f32)
    axis = torch.as_tensor(np.array([e.axis for e in estimates]), **f32)
    L = torch.as_tensor([e.length_mm for e in estimates], **f32)
    d = torch.as_tensor([e.diameter_mm for e in estimates], **f32)
    hd = torch.as_tensor([e.head_diameter_mm for e in estimates], **f32)
    hh = torch.as_tensor([e.head_height_mm for e in estimates], **f32)
    tl = torch.as_tensor([e.tip_length_mm for e in estimates], **f32)
    for vi, pv in enumerate(prob.per_view):
        if pv is None:
            per_view[:, vi] = 0.0
            continue
        _, _, h, s = _composite(pv, entry, axis, L, d, hd, hh, tl, 0.3)
        mine = (1 - (1 - h) * (1 - s)) > 0.5
        target_fg = (pv["target"].sum(0) > 0.5)[pv["pix"]]
        n = pv["union"].size
        # Pixels some screw explains.
        covered = torch.zeros(n, dtype=torch.bool, device=device)
        covered[pv["pix"][mine]] = True
        for k in range(K):
            sel = pv["screw"] == k
            if not bool(sel.any()):
                per_view[k, vi] = 0.0
                continue
            m = mine[sel]
            t = target_fg[sel]
            other = covered[pv["pix"][sel]] & ~m
            inter = (m & t).sum().item()
            union = (m | (t & ~other)).sum().item()
            per_view[k, vi] = inter / union if union else 0.0
    out = []
    for k, e in enumerate(estimates):
        out.append(replace(e, confidence=float(per_view[k].min()), view_confidence=[float(x) for x in per_view[k]]))
    return out


@torch.no_grad()
def render_labels(view: geometry.View, estimates, device="cpu") -> np.ndarray:
    """Hard label map (uint8 [v,u]: 0 background, 1 head, 2 shaft) of screws in one view,
    by the CASE_FORMAT rule (head wins).  Used for the fit overlay and synthetic tests."""
    labels = np.zeros((view.height, view.width), np.uint8)
    if not estimates:
        return labels
    with single_thread(device):
        return _render_labels(view, estimates, device, labels)


def _render_labels(view, estimates, device, labels):
    rays = [_ViewRays(view, torch.device(device))]
    dummy = [torch.zeros(2, view.width * view.height)]
    prob = _Problem([view], rays, dummy, estimates, 1, 3, torch.device(device))
    pv = prob.per_view[0]
    if pv is None:
        return labels
    f32 = dict(dtype=torch.float32)
    entry = torch.as_tensor(np.array([e.entry_mm for e in estimates]), **f32)
    axis = torch.as_tensor(np.array([e.axis for e in estimates]), **f32)
    L = torch.as_tensor([e.length_mm for e in estimates], **f32)
    d = torch.as_tensor([e.diameter_mm for e in estimates], **f32)
    hd = torch.as_tensor([e.head_diameter_mm for e in estimates], **f32)
    hh = torch.as_tensor([e.head_height_mm for e in estimates], **f32)
    tl = torch.as_tensor([e.tip_length_mm for e in estimates], **f32)
    H, S, _, _ = _composite(pv, entry, axis, L, d, hd, hh, tl, 0.05)
    flat = labels.reshape(-1)
    union = pv["union"]
    flat[union[(S > 0.5).numpy()]] = 2
    flat[union[(H > 0.5).numpy()]] = 1
    return labels
