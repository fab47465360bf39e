"""Training of the screw segmentation U-Net on simulated X-rays.

The only path from the pipeline's world to the simulator's: ``segmentation``
never imports this module.

Data (all from the example CT, every random process seeded):

1. **Bank** (:func:`build_bank`, cached in an ``.npz``): a pool of random C-arm
   views (AP, lateral, obliques up to +-30 deg around both, cranial/caudal tilt,
   varied isocentre, SID/SDD, pixel pitch, detector size).  Per view the
   expensive parts are computed once with the simulator (``xray``): the CT's
   material line integrals (g/cm^2 of soft tissue and bone) and, per candidate
   screw (planned bilateral trajectories with random misplacements and sizes,
   screw shapes varied beyond the catalogue, plus free-floating screws), its
   titanium path lengths (mm) for head and shaft, stored as small crops.
2. **Samples** (:func:`render_sample`), composited on the fly: a random subset of
   0-12 screws, distractors that are metal but not screws (rods, K-wires,
   clamps, retractor blades, ECG leads and electrodes, calibration beads, table
   edge), a random zoom/rotation/flip/crop, then physics on the crop: a
   polychromatic spectrum (spekpy; kVp, filtration), titanium density varied
   +-25%, quantum noise at a random dose, scatter, detector blur, vignetting,
   then the display: log or linear, either polarity, window/level with
   saturation, gamma and random tone curves, edge enhancement, the circular
   field of an image intensifier or a collimated square field, burned-in text
   and markers, 8- or 16-bit quantisation.
3. The network input is ``segmentation.preprocess(image, metal=hint)``: the very
   function inference uses.
4. Optionally (``p_renderer``, :func:`renderer_pairs`) part of each batch comes from whole
   bank views rendered by the simulator's own ``xray.render_view`` with
   ``xray.RenderParams.random`` and 3D distractors, a second renderer beside the compositor,
   so that the network learns screws rather than one renderer's look.

Held out from training (kept for the test set, ``bench/bench_segmentation.py``):
vertebral levels :data:`TEST_LEVELS`, C-arm angle bands :data:`TEST_LAO_BANDS_DEG`,
screw diameters :data:`TEST_DIAMETERS_MM`, and the test seeds.

CLI: ``pedicle-screw-pose train-segmentation --out DIR [--seed S] [--steps N]
[--minutes M] [--device cpu|cuda] [--resume]``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from . import segmentation
from .evaluation import dice_per_class  # noqa: F401  (the metric, kept importable here)

__all__ = [
    "TRAIN_LEVELS",
    "TEST_LEVELS",
    "TEST_LAO_BANDS_DEG",
    "TEST_DIAMETERS_MM",
    "build_bank",
    "load_or_build_bank",
    "render_sample",
    "training_pair",
    "train",
    "dice_per_class",
    "add_train_segmentation_arguments",
    "train_segmentation_command",
]

# Held-out split (see the module docstring).
TRAIN_LEVELS = ("T6", "T7", "T8", "T9", "T10", "T11", "L1", "L2")
TEST_LEVELS = ("T12", "L3", "T4", "T5")
TEST_LAO_BANDS_DEG = ((12.0, 17.0), (-22.0, -17.0), (73.0, 78.0), (97.0, 102.0))
TEST_DIAMETERS_MM = (5.5, 7.5)
_DIAMETER_GAP_MM = 0.2   # training diameters stay this far from the test ones
DEFAULT_SEED = 20240611
TEST_SEED_OFFSET = 7_000_003  # test banks/samples use seed + this; training never does

CROP_PX = 128


# =========================================================================== bank
def _in_bands(angle, bands):
    return any(lo <= angle <= hi for lo, hi in bands)


def _random_view(rng, split: str, ct_center, size_px=None):
    """A random C-arm view for ``split`` ("train" avoids the test angle bands, "test" uses only them)."""
    from . import geometry

    lateral = rng.random() < 0.4
    for _ in range(1000):
        if split == "test":
            lo, hi = TEST_LAO_BANDS_DEG[rng.integers(len(TEST_LAO_BANDS_DEG))]
            lao = float(rng.uniform(lo, hi))
            break
        base = 90.0 if lateral else 0.0
        lao = float(base + rng.uniform(-30, 30))
        if not _in_bands(lao, TEST_LAO_BANDS_DEG):
            break
    if rng.random() < 0.15:  # left/right lateral, PA-ish: the C-arm can be either side
        lao = -lao
    cranial = float(rng.uniform(-20, 20))
    sid = float(rng.uniform(500, 800))
    sdd = float(sid + rng.uniform(250, 500))
    # one detector size per bank (arrays stack); other sizes come from the zoom/crop augmentation
    size = int(size_px or 512)
    # pixel size at the isocentre 0.35-0.9 mm: screws 7-19 px wide before zoom augmentation
    iso_px = float(rng.uniform(0.35, 0.9))
    pixel_mm = iso_px * sdd / sid
    iso = np.asarray(ct_center, float) + rng.normal(0, [15, 15, 40])
    return geometry.carm_view(
        f"{split}-{lao:+.0f}-{cranial:+.0f}", isocenter_mm=iso, lao_deg=lao, cranial_deg=cranial,
        sid_mm=sid, sdd_mm=sdd, pixel_mm=pixel_mm, width=size, height=size,
        principal_offset_px=tuple(rng.normal(0, 10, 2)), detector_roll_deg=float(rng.normal(0, 4))), iso_px


def _random_spec(rng, split: str):
    """A screw spec; shapes vary beyond the catalogue (head size, thread, core, tip)."""
    from .screw import ScrewSpec

    if split == "test":
        d = float(rng.choice(TEST_DIAMETERS_MM))
    else:
        while True:
            d = float(np.round(rng.uniform(4.0, 8.5), 1))
            if all(abs(d - t) > _DIAMETER_GAP_MM for t in TEST_DIAMETERS_MM):
                break
    length = float(np.round(rng.uniform(25, 60) / 5) * 5)
    base = ScrewSpec.from_size(d, length)
    if split == "test" or rng.random() < 0.35:
        return base
    f = {}
    for name in ("core_diameter_mm", "pitch_mm", "tip_length_mm", "head_diameter_mm", "head_height_mm"):
        f[name] = getattr(base, name) * float(rng.uniform(0.75, 1.3))
    f["core_diameter_mm"] = min(f["core_diameter_mm"], 0.92 * d)
    f["head_diameter_mm"] = max(f["head_diameter_mm"], d + 2.0)
    f["tip_length_mm"] = min(f["tip_length_mm"], 0.4 * length)
    try:
        return dataclasses.replace(base, name=f"var-{d:.1f}x{length:.0f}", **f)
    except (ValueError, TypeError):
        return base


def _plan(labels, ct, levels, rng):
    """Bilateral (entry, tip, level, side) per level: planning.plan_screws, or a crude private fallback."""
    try:
        from . import planning

        return [(s.entry_mm, s.tip_mm, s.level, s.side)
                for s in planning.plan_screws(labels, ct, levels=tuple(levels), rng=rng)]
    except Exception as exc:  # noqa: BLE001 - planning missing or refusing a level: use the fallback
        print(f"training: planning.plan_screws unavailable for {levels} ({type(exc).__name__}: {exc}); "
              "using the private fallback trajectories")
    return _fallback_plan(labels, levels)


def _fallback_plan(labels, levels):
    """Entry posterior-lateral, tip in the anterior body, converging medially (RAS mm)."""
    out = []
    name_to_label = {v: k for k, v in labels.names.items()}
    for lv in levels:
        if lv not in name_to_label:
            continue
        kji = np.argwhere(labels.array == name_to_label[lv])
        if len(kji) < 50:
            continue
        kji = kji[:: max(1, len(kji) // 20000)]
        ras = (labels.ijk_to_ras @ np.c_[kji[:, ::-1], np.ones(len(kji))].T).T[:, :3]
        a_hi = np.percentile(ras[:, 1], 98)
        body = ras[ras[:, 1] > a_hi - 0.45 * (a_hi - np.percentile(ras[:, 1], 2))]
        c = body.mean(0)
        half_w = 0.5 * (np.percentile(body[:, 0], 98) - np.percentile(body[:, 0], 2))
        depth = np.percentile(body[:, 1], 98) - np.percentile(body[:, 1], 2)
        for side, sgn in (("right", 1.0), ("left", -1.0)):
            entry = c + np.array([sgn * 0.75 * half_w, -(0.5 * depth + 20.0), 0.0])
            tip = c + np.array([sgn * 0.15 * half_w, 0.3 * depth, 0.0])
            out.append((entry, tip, lv, side))
    return out


def _candidate_screws(rng, split, ct, labels, levels, n_free, spec_pool):
    """Planned bilateral screws (some misplaced, random sizes) plus free-floating screws."""
    from .screw import Screw, pose_from_entry_tip

    present = [lv for lv in levels if lv in set(labels.names.values())]
    screws = []
    for entry, tip, level, side in _plan(labels, ct, present, rng):
        spec = spec_pool[rng.integers(len(spec_pool))]
        entry, tip = np.asarray(entry, float), np.asarray(tip, float)
        axis = (tip - entry) / np.linalg.norm(tip - entry)
        if rng.random() < 0.3:  # misplacement: tilt the trajectory about the entry and shift it
            axis = axis + rng.normal(0, 0.15, 3)
            axis /= np.linalg.norm(axis)
            entry = entry + rng.normal(0, 3, 3)
        depth = float(rng.uniform(-4, 6))  # head sunk into / standing off the bone
        entry = entry + depth * axis
        T = pose_from_entry_tip(entry, entry + spec.length_mm * axis, roll_deg=float(rng.uniform(0, 360)))
        screws.append(Screw(spec=spec, T_world_from_screw=T, id=f"{level}-{side}", level=level, side=side))
    # free screws anywhere near the spine, any orientation (other surgeons, other anatomy)
    centre = np.asarray(labels.center_ras, float)
    for k in range(n_free):
        spec = spec_pool[rng.integers(len(spec_pool))]
        entry = centre + rng.normal(0, [30, 30, 70])
        axis = rng.normal(0, 1, 3)
        axis /= np.linalg.norm(axis)
        T = pose_from_entry_tip(entry, entry + spec.length_mm * axis, roll_deg=float(rng.uniform(0, 360)))
        screws.append(Screw(spec=spec, T_world_from_screw=T, id=f"free{k}", level=None, side=None))
    return screws


def build_bank(path, n_views: int, seed: int, split: str = "train", device="cpu", progress=True) -> dict:
    """Compute and save (``.npz``) the cached per-view line integrals and per-screw path lengths.

    Returns the bank as a dict of arrays (see :func:`load_or_build_bank`).
    """
    import torch
    from tqdm import tqdm

    from . import ct as ctmod
    from . import xray

    rng = np.random.default_rng(seed)
    ct, labels = ctmod.example_ct()
    pct = xray.prepare_ct(ctmod.material_volumes(ct), device=device)
    levels = TRAIN_LEVELS if split == "train" else TEST_LEVELS
    # a pool of screw shapes: each new shape costs ~1 s (its attenuation volume), reuse costs nothing
    spec_pool = [_random_spec(rng, split) for _ in range(24 if split == "train" else 8)]
    views, soft, bone, px_iso = [], [], [], []
    scr_view, scr_box, scr_head, scr_shaft, scr_side, scr_level, scr_head_px = [], [], [], [], [], [], []
    it = tqdm(range(n_views), desc=f"bank ({split})", disable=not progress)
    for vi in it:
        view, iso_px = _random_view(rng, split, labels.center_ras)
        # binning 2: anatomy is smooth at this scale, screws (below) are traced at full resolution
        li = xray.ct_line_integrals(pct, view, device=device, binning=2)
        views.append(np.concatenate([view.P.ravel(), [view.width, view.height]]))
        px_iso.append(iso_px)
        soft.append(_np(li["soft"]).astype(np.float16))
        bone.append(_np(li["bone"]).astype(np.float16))
        screws = _candidate_screws(rng, split, ct, labels, levels, int(rng.integers(2, 6)), spec_pool)
        for s in screws:
            h, sh = xray.screw_path_lengths([s], view, device=device)
            h, sh = _np(h), _np(sh)
            occ = (h > xray.LABEL_THRESHOLD_MM) | (sh > xray.LABEL_THRESHOLD_MM)
            if not occ.any():
                continue
            vv, uu = np.nonzero(occ)
            v0, v1, u0, u1 = vv.min(), vv.max() + 1, uu.min(), uu.max() + 1
            scr_view.append(vi)
            scr_box.append((v0, v1, u0, u1))
            scr_head.append(h[v0:v1, u0:u1].astype(np.float16))
            scr_shaft.append(sh[v0:v1, u0:u1].astype(np.float16))
            scr_side.append({"left": 0, "right": 1}.get(s.side, 2))
            scr_level.append(s.level or "")
            hp = segmentation_project_head(view, s)
            scr_head_px.append(hp)
        it.set_postfix(screws=len(scr_view))
    # ragged crops packed into flat arrays
    sizes = np.array([a.size for a in scr_head], np.int64)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    bank = {
        "split": np.array(split), "seed": np.array(seed),
        "views": np.stack(views), "px_iso_mm": np.array(px_iso, np.float32), "soft": np.stack(soft), "bone": np.stack(bone),
        "scr_view": np.array(scr_view, np.int32), "scr_box": np.array(scr_box, np.int32).reshape(-1, 4),
        "scr_off": offs, "scr_head": np.concatenate([a.ravel() for a in scr_head]) if scr_head else np.zeros(0, np.float16),
        "scr_shaft": np.concatenate([a.ravel() for a in scr_shaft]) if scr_shaft else np.zeros(0, np.float16),
        "scr_side": np.array(scr_side, np.int8), "scr_level": np.array(scr_level),
        "scr_head_px": np.array(scr_head_px, np.float32).reshape(-1, 2),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **bank)
    os.replace(tmp, path)
    del torch
    return bank


def segmentation_project_head(view, screw) -> tuple[float, float]:
    """Pixel (u, v) of the screw's head centre (for rods between heads)."""
    from . import geometry

    c = screw.to_world(np.array([[0.0, 0.0, -0.5 * screw.spec.head_height_mm]]))
    uv = geometry.project(view.P, c)[0]
    return float(uv[0]), float(uv[1])


def _np(t):
    try:
        import torch

        if isinstance(t, torch.Tensor):
            return t.detach().cpu().float().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(t, dtype=np.float32)


def load_or_build_bank(path, n_views: int, seed: int, split: str = "train", device="cpu") -> dict:
    """The bank at ``path`` if it was built with the same split and seed, else build it."""
    path = Path(path)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            bank = {k: z[k] for k in z.files}
        if str(bank["split"]) == split and int(bank["seed"]) == seed and len(bank["views"]) >= n_views:
            return bank
    return build_bank(path, n_views, seed, split=split, device=device)


def _bank_screw(bank, k):
    v0, v1, u0, u1 = bank["scr_box"][k]
    a, b = bank["scr_off"][k], bank["scr_off"][k + 1]
    shape = (v1 - v0, u1 - u0)
    return (v0, v1, u0, u1), bank["scr_head"][a:b].reshape(shape), bank["scr_shaft"][a:b].reshape(shape)


def _bank_screw_paths(bank, chosen, shape):
    """Titanium path lengths (mm) ``(head, shaft)`` of the bank screws ``chosen``, summed over a view of ``shape``."""
    head = np.zeros(shape, np.float32)
    shaft = np.zeros(shape, np.float32)
    for k in chosen:
        (v0, v1, u0, u1), h, s = _bank_screw(bank, int(k))
        head[v0:v1, u0:u1] += h
        shaft[v0:v1, u0:u1] += s
    return head, shaft


# =========================================================================== physics
class _Physics:
    """Spectra (spekpy) on a kVp grid and mass attenuation (xraydb via ct) on their energy bins."""

    KVPS = (60, 70, 80, 90, 100, 110, 120)
    FILTRATION_MM_AL = (2.5, 4.0, 6.0)

    def __init__(self):
        from . import ct as ctmod
        import spekpy

        self.spectra = {}
        for kvp in self.KVPS:
            for filt in self.FILTRATION_MM_AL:
                s = spekpy.Spek(kvp=kvp, th=12, dk=4)
                s.filter("Al", filt)
                k, f = s.get_spectrum()
                keep = k >= 15
                k, f = k[keep], f[keep]
                w = f * k  # energy-integrating detector
                self.spectra[(kvp, filt)] = (k.astype(np.float64), (w / w.sum()).astype(np.float64))
        self.mu = {}
        for (kvp, filt), (k, _w) in self.spectra.items():
            self.mu[(kvp, filt)] = {m: ctmod.mass_attenuation_cm2_g(m, k) for m in ("soft", "bone", "titanium", "steel")}
        self.ti_density = ctmod.DENSITY_G_CM3.get("titanium", 4.43)
        self.steel_density = ctmod.DENSITY_G_CM3.get("steel", 7.9)


_PHYSICS = None


def _physics():
    global _PHYSICS
    if _PHYSICS is None:
        _PHYSICS = _Physics()
    return _PHYSICS


# =========================================================================== samples
def render_sample(bank, rng, out_px: int = CROP_PX, full_view: bool = False, style: dict | None = None):
    """One simulated X-ray and its label map from the bank.

    Returns ``(image, labels, metal)``: ``image`` uint8/uint16 ``[v, u]`` as a file
    would hold it, ``labels`` uint8 (0/1/2), ``metal`` "bright"/"dark".
    ``full_view=True`` renders the whole bank view at its own size (for tests and
    benchmarks); otherwise a random zoomed/rotated ``out_px`` crop.  ``style``
    overrides random choices (keys: ``n_screws``, ``metal``, ``dose``, ``lateral``).
    """
    import torch
    import torch.nn.functional as F

    style = dict(style or {})
    nv = len(bank["views"])
    vi = int(rng.integers(nv))
    H, W = bank["soft"][vi].shape
    # ---- screws: a random subset among this view's candidates
    cand = np.nonzero(bank["scr_view"] == vi)[0]
    n = style.get("n_screws")
    if n is None:
        n = int(rng.choice([0, 1, 2, 3, 4, 6, 8, 10, 12], p=[.12, .1, .1, .1, .14, .13, .11, .1, .1]))
    n = min(n, len(cand))
    chosen = rng.choice(cand, size=n, replace=False) if n else np.zeros(0, int)
    head, shaft = _bank_screw_paths(bank, chosen, (H, W))
    thr = _label_threshold_mm()
    labels = np.where(head > thr, 1, np.where(shaft > thr, 2, 0)).astype(np.uint8)
    # ---- distractors (mm of steel / titanium along the rays), drawn at bank resolution
    px_mm_iso = float(bank["px_iso_mm"][vi])
    steel, ti_extra = _distractors(rng, (H, W), px_mm_iso, bank["scr_head_px"][chosen], bank["scr_side"][chosen])
    chans = np.stack([bank["soft"][vi].astype(np.float32), bank["bone"][vi].astype(np.float32),
                      head + shaft + ti_extra, steel, labels.astype(np.float32)])
    # ---- geometry: zoom / rotate / flip / crop (one affine resampling of every channel)
    if full_view:
        out_h, out_w = H, W
        crop = chans
    else:
        out_h = out_w = out_px
        theta = _random_affine(rng, (H, W), out_px, bank["scr_head_px"][chosen] if n else None, px_mm_iso)
        t = torch.from_numpy(chans)[None]
        grid = F.affine_grid(torch.from_numpy(theta)[None].float(), (1, 5, out_h, out_w), align_corners=False)
        phys = F.grid_sample(t[:, :4], grid, mode="bilinear", padding_mode="border", align_corners=False)
        lab = F.grid_sample(t[:, 4:], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        crop = torch.cat([phys, lab], 1)[0].numpy()
        # the whole view at 1/8 resolution, for scatter and exposure (see _physics_and_display)
        small = F.avg_pool2d(t[:, :4], 8)[0].numpy()
        context = {"soft": small[0], "bone": small[1], "ti": small[2], "steel": small[3], "grid": grid}
    labels = crop[4].round().astype(np.uint8)
    image, field, metal = _physics_and_display(rng, crop[0], crop[1], crop[2], crop[3], style,
                                               context=None if full_view else context)
    labels[~field] = 0  # nothing is visible in the unexposed surround, nor where metal shows no contrast
    return image, labels, metal


def _label_threshold_mm():
    from . import xray

    return float(getattr(xray, "LABEL_THRESHOLD_MM", 0.05))


#: Pixel sizes (mm at the isocentre) of the training crops.  Inference resamples every image
#: to segmentation.TARGET_MM_PER_PX (0.55) or leaves a coarser one as it is, so the crops
#: cover that and coarser, rather than the fine pixels inference never shows the network.
CROP_MM_PER_PX = (0.4, 1.1)


def _random_affine(rng, shape, out_px, heads_uv, px_mm_iso=None):
    """affine_grid theta (output normalised coords → input normalised coords).

    With ``px_mm_iso`` (the bank view's pixel size at the isocentre) the crop's pixel size
    is log-uniform in ``CROP_MM_PER_PX``; without, the zoom is log-uniform in 0.55-1.8."""
    H, W = shape
    if px_mm_iso:
        out_mm = float(np.exp(rng.uniform(np.log(CROP_MM_PER_PX[0]), np.log(CROP_MM_PER_PX[1]))))
        zoom = out_mm / float(px_mm_iso)   # input px per output px
    else:
        zoom = float(np.exp(rng.uniform(np.log(0.55), np.log(1.8))))
    ang = float(rng.uniform(0, 2 * np.pi)) if rng.random() < 0.5 else float(rng.normal(0, 0.2))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    half_in = zoom * out_px / 2.0
    if heads_uv is not None and len(heads_uv) and rng.random() < 0.7:
        c = heads_uv[rng.integers(len(heads_uv))] + rng.normal(0, 0.35 * half_in, 2)
    else:
        c = np.array([rng.uniform(0.2, 0.8) * W, rng.uniform(0.2, 0.8) * H])
    c = np.clip(c, [0, 0], [W - 1, H - 1])
    # output normalised (x, y) in [-1, 1] → input pixels: c + R S (x, y) * half_in
    ca, sa = np.cos(ang), np.sin(ang)
    A = half_in * np.array([[ca * flip, -sa], [sa * flip, ca]])
    # pixels → input normalised: (p + 0.5) / W * 2 - 1
    theta = np.zeros((2, 3))
    theta[0, :2] = A[0] * 2 / W
    theta[1, :2] = A[1] * 2 / H
    theta[0, 2] = (c[0] + 0.5) * 2 / W - 1
    theta[1, 2] = (c[1] + 0.5) * 2 / H - 1
    return theta


def _distractors(rng, shape, px_mm, heads_uv, sides):
    """2D maps (mm of steel, mm of extra titanium) of non-screw metal."""
    H, W = shape
    steel = np.zeros(shape, np.float32)
    ti = np.zeros(shape, np.float32)
    vv, uu = np.mgrid[0:H, 0:W].astype(np.float32)

    def seg_dist(p, q):
        d = q - p
        L2 = float(d @ d) + 1e-9
        tt = np.clip(((uu - p[0]) * d[0] + (vv - p[1]) * d[1]) / L2, 0, 1)
        return np.hypot(uu - (p[0] + tt * d[0]), vv - (p[1] + tt * d[1]))

    def cylinder(p, q, radius_mm):  # path length through a cylinder seen side-on
        r = radius_mm / px_mm
        dist = seg_dist(p, q)
        return 2 * np.sqrt(np.clip(r * r - dist * dist, 0, None)) * px_mm

    def rand_pt(margin=0.1):
        return np.array([rng.uniform(margin, 1 - margin) * W, rng.uniform(margin, 1 - margin) * H])

    # rods between the heads of one side (a posterior construct)
    if len(heads_uv) >= 2 and rng.random() < 0.1:
        for side in (0, 1):
            pts = heads_uv[sides == side]
            if len(pts) >= 2:
                order = np.argsort(pts[:, 1])
                pts = pts[order]
                r = rng.uniform(2.5, 3.2)
                ext = (pts[-1] - pts[0]) * rng.uniform(0.02, 0.12)
                ti += cylinder(pts[0] - ext, pts[-1] + ext, r)
    if rng.random() < 0.12:   # K-wires / guide wires
        for _ in range(rng.integers(1, 4)):
            p = rand_pt(0.0)
            q = p + rng.normal(0, 1, 2) * rng.uniform(0.3, 1.0) * max(H, W)
            steel += cylinder(p, q, rng.uniform(0.5, 1.25))
    if rng.random() < 0.08:   # retractor blades / clamps: long flat steel bars with a few holes
        for _ in range(rng.integers(1, 3)):
            p = rand_pt(0.0)
            q = p + rng.normal(0, 1, 2) * rng.uniform(0.2, 0.6) * max(H, W)
            d = seg_dist(p, q)
            w = rng.uniform(4, 15) / px_mm
            steel += np.where(d < w, rng.uniform(1.0, 3.0), 0).astype(np.float32)
    if rng.random() < 0.1:    # ECG electrodes with leads
        for _ in range(rng.integers(1, 4)):
            c = rand_pt(0.05)
            r = rng.uniform(4, 8) / px_mm
            steel += np.where(np.hypot(uu - c[0], vv - c[1]) < r, rng.uniform(0.2, 0.8), 0).astype(np.float32)
            q = c + rng.normal(0, 1, 2) * max(H, W)
            steel += cylinder(c, q, 0.5) * 0.5
    if rng.random() < 0.06:   # calibration phantom beads: a grid of small steel spheres
        c0 = rand_pt(0.1)
        step = rng.uniform(8, 20) / px_mm
        r = rng.uniform(1.0, 2.5) / px_mm
        for i in range(-3, 4):
            for j in range(-3, 4):
                c = c0 + step * np.array([i, j])
                d2 = (uu - c[0]) ** 2 + (vv - c[1]) ** 2
                steel += 2 * np.sqrt(np.clip(r * r - d2, 0, None)) * px_mm
    if rng.random() < 0.06:   # table edge / rail: a half plane of metal
        n = rng.normal(0, 1, 2)
        n /= np.linalg.norm(n)
        c = rand_pt(0.0)
        steel += np.where((uu - c[0]) * n[0] + (vv - c[1]) * n[1] > 0, rng.uniform(0.5, 3.0), 0).astype(np.float32)
    return steel, ti


def _gauss(x, sigma):
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma, mode="nearest") if sigma > 0.05 else x


def _primary(E, w, mu, soft, bone, ti_g, st_g):
    """Polychromatic primary intensity I/I0 (energy-integrating) of material path lengths (g/cm^2)."""
    I = np.zeros(np.shape(soft), np.float64)
    for e_i in range(len(E)):
        a = mu["soft"][e_i] * soft + mu["bone"][e_i] * bone + mu["titanium"][e_i] * ti_g + mu["steel"][e_i] * st_g
        I += w[e_i] * np.exp(-np.minimum(a, 60.0))
    return (I / max(float(np.sum(w)), 1e-12)).astype(np.float32)


def _physics_and_display(rng, soft, bone, ti_mm, steel_mm, style, context=None):
    """Polychromatic intensity, noise, scatter, blur, then the display transform and quantisation.

    Exposure follows the body like a C-arm's automatic exposure control (photons at the median
    pixel of the field), and the display window is set on the anatomy so that metal, the most
    attenuating thing on a spine image, is never hidden: it may saturate, anatomy may not
    saturate to the same level (the label map must describe what can be seen).

    ``context``: the whole view at low resolution (keys ``soft``, ``bone``, ``ti``, ``steel``)
    and ``grid`` (the crop's sampling grid in it, ``affine_grid`` coordinates).  Scatter and
    the automatic exposure come from the whole field, as on a C-arm: a crop of dense anatomy
    next to bright soft tissue gets the scatter of the whole image (low contrast over the
    vertebral bodies of a lateral view) and the photons the exposure control left it.
    """
    ph = _physics()
    kvp = ph.KVPS[rng.integers(len(ph.KVPS))]
    filt = ph.FILTRATION_MM_AL[rng.integers(len(ph.FILTRATION_MM_AL))]
    E, w = ph.spectra[(kvp, filt)]
    mu = ph.mu[(kvp, filt)]
    ti_scale = float(rng.uniform(0.75, 1.25))
    tissue_scale = float(rng.uniform(0.7, 1.3))
    bone_scale = float(rng.uniform(0.8, 1.2)) * tissue_scale
    ti_k = 0.1 * ph.ti_density * ti_scale
    st_k = 0.1 * ph.steel_density
    I = _primary(E, w, mu, soft * tissue_scale, bone * bone_scale, ti_mm * ti_k, steel_mm * st_k)
    # scatter: the primary blurred over 6-20% of the field, 0-1.2 of it (scatter-to-primary
    # ratios far above 1 where the anatomy is dense)
    sf = 1.2 * float(rng.uniform(0.0, 1.0)) ** 1.5   # median ~0.4
    sig_frac = float(rng.uniform(0.06, 0.2))
    med_total = None
    if context is not None:
        import torch
        import torch.nn.functional as F

        Ic = _primary(E, w, mu, context["soft"] * tissue_scale, context["bone"] * bone_scale,
                      context["ti"] * ti_k, context["steel"] * st_k)
        Sc = _gauss(Ic, sig_frac * max(Ic.shape))
        med_total = float(np.median(Ic + sf * Sc))
        S = F.grid_sample(torch.from_numpy(Sc.astype(np.float32))[None, None], context["grid"], mode="bilinear",
                          padding_mode="border", align_corners=False)[0, 0].numpy()
    else:
        S = _gauss(I, sig_frac * max(I.shape))
    I = I + sf * S
    h, w_ = I.shape
    vv, uu = np.mgrid[0:h, 0:w_].astype(np.float32)
    if rng.random() < 0.5:  # anode heel: a gain ramp across the field
        ang = rng.uniform(0, 2 * np.pi)
        ramp = ((uu - w_ / 2) * np.cos(ang) + (vv - h / 2) * np.sin(ang)) / max(h, w_)
        I = I * (1 + rng.uniform(-0.3, 0.3) * ramp)
    # automatic exposure: photons at the median pixel
    dose = style.get("dose")
    n_med = float(dose) if dose is not None else float(np.exp(rng.uniform(np.log(60), np.log(5000))))
    scale = n_med / max(float(np.median(I)) if med_total is None else med_total, 1e-12)
    counts = I * scale
    counts = counts + np.sqrt(np.clip(counts, 1e-9, None)) * rng.standard_normal(I.shape).astype(np.float32)
    I = np.clip(counts / scale, 1e-7, None)
    I = _gauss(I, float(rng.uniform(0.0, 1.6)))
    r2 = ((uu - w_ / 2) ** 2 + (vv - h / 2) ** 2) / (0.5 * max(h, w_)) ** 2
    I = np.clip(I * (1 - rng.uniform(0, 0.3) * r2), 1e-7, None)
    metal = style.get("metal") or ("bright" if rng.random() < 0.55 else "dark")
    resp = rng.random()
    if resp < 0.2:  # linear response (1 - I/I0): dense regions compressed, as some consoles show
        att = 1.0 - I / max(float(np.percentile(I, 99.5)), 1e-6)
    elif resp < 0.4:  # a softer, partly linear display curve of some consoles
        att = -np.log(I + rng.uniform(0.0, 0.05) * float(np.median(I)))
    else:
        att = -np.log(I)
    if rng.random() < 0.4:  # dynamic range compression: part of the low-pass removed
        att = att - rng.uniform(0.2, 0.7) * _gauss(att, rng.uniform(0.05, 0.25) * max(h, w_))
    ti_mask = ti_mm > 0.3
    anat = att[~ti_mask] if (~ti_mask).sum() > 100 else att.ravel()
    lo = np.percentile(anat, rng.uniform(0, 5))
    hi_anat = np.percentile(anat, rng.uniform(97.0, 100))
    mode = rng.random()
    if mode < 0.45:
        # Automatic brightness control on the anatomy alone, as most consoles do: metal saturates
        # at the same grey as the densest anatomy (a screw over it cannot be seen; its label stays,
        # as in the test renderer and in hand-drawn labels of real images).
        hi = np.percentile(anat, rng.uniform(96.0, 100))
    elif mode < 0.65:
        # The window's top above the metal: a lateral view whose densest part (abdomen, shoulders)
        # sets the window leaves the screws mid-grey, seen only by their local contrast.
        top = max(np.percentile(att[ti_mask], 50) if ti_mask.sum() > 10 else hi_anat, hi_anat)
        hi = top + rng.uniform(0.1, 1.2) * max(top - lo, 1e-6)
    elif ti_mask.sum() > 10:
        hi_metal = np.percentile(att[ti_mask], 50)
        # the window's top lies between the densest anatomy and the metal (or at the metal)
        hi = hi_anat + rng.uniform(0.15, 1.0) * max(hi_metal - hi_anat, 0.0)
    else:
        hi = hi_anat + rng.uniform(0.0, 0.3) * max(hi_anat - lo, 1e-6)
    x = np.clip((att - lo) / max(hi - lo, 1e-6), 0, 1)
    if metal == "dark":
        x = 1 - x
    x = x ** float(np.exp(rng.normal(0, 0.3)))
    if rng.random() < 0.25:
        k = rng.uniform(3, 7)
        x = 1 / (1 + np.exp(-k * (x - 0.5)))
        x = (x - x.min()) / max(x.max() - x.min(), 1e-6)
    if rng.random() < 0.4:
        x = x + rng.uniform(0.3, 1.2) * (x - _gauss(x, rng.uniform(2, 8)))
    x = np.clip(x, 0, 1)
    field = np.ones(x.shape, bool)
    fr = rng.random()
    if fr < 0.4:
        cx, cy = w_ / 2 + rng.normal(0, 0.05 * w_), h / 2 + rng.normal(0, 0.05 * h)
        rad = rng.uniform(0.42, 0.62) * min(h, w_)
        rr = np.hypot(uu - cx, vv - cy)
        field = rr < rad
        x = x * np.clip((rad - rr) / 3.0, 0, 1)
    elif fr < 0.55:
        m = [int(rng.uniform(0, 0.2) * s) for s in (h, h, w_, w_)]
        field[: m[0], :] = field[h - m[1]:, :] = False
        field[:, : m[2]] = field[:, w_ - m[3]:] = False
        x = np.where(field, x, 0.0)
    if rng.random() < 0.35:
        x = _burn_text(rng, x)
    bits = 16 if rng.random() < 0.4 else 8
    top = (1 << bits) - 1 if rng.random() < 0.8 else int(rng.uniform(0.3, 0.9) * ((1 << bits) - 1))
    img = np.round(np.clip(x, 0, 1) * top).astype(np.uint16 if bits == 16 else np.uint8)
    return img, field & _metal_visible(x, ti_mm, steel_mm), metal


def _background_around(x, metal_m):
    """``(bg, w)``: the mean of ``x`` over the non-metal pixels near each pixel (Gaussian, 5 px),
    leaving out a 2-pixel rim around the metal, and the weight of those pixels (near 0: no
    background within reach)."""
    from scipy import ndimage

    near = ndimage.binary_dilation(metal_m, iterations=2)
    w = _gauss((~near).astype(np.float32), 5.0)
    bg = _gauss(np.where(near, 0.0, x).astype(np.float32), 5.0) / np.maximum(w, 1e-3)
    return bg, w


def _metal_visible(x, ti_mm, steel_mm, min_contrast: float = 0.03):
    """False on metal pixels that show no contrast against the anatomy around them.

    A screw over anatomy that the display saturates (or that a linear response flattens) cannot
    be seen; labelling it there teaches the network to call screws on featureless regions.  The
    local background is the mean displayed grey of the non-metal pixels within a few pixels.
    """
    metal_m = (ti_mm > 0.05) | (steel_mm > 0.05)
    if not metal_m.any():
        return np.ones(x.shape, bool)
    bg, w = _background_around(x, metal_m)
    contrast = np.abs(_gauss(x.astype(np.float32), 1.0) - bg)
    return ~metal_m | (contrast > min_contrast) | (w < 0.05)


def _visible_screws(x, labels, min_contrast: float = 0.03):
    """False on the screw label regions (connected) whose mean contrast in ``x`` is under ``min_contrast``.

    ``x``: the network's input (``segmentation.preprocess``: 0-1 over the field's window).
    Judged per region, not per pixel as :func:`_metal_visible` does: under heavy noise a
    per-pixel test keeps a random speckle of an invisible screw, and a head larger than the
    background kernel has no background near its centre and always passes.
    """
    from scipy import ndimage

    metal_m = labels > 0
    if not metal_m.any():
        return np.ones(x.shape, bool)
    bg, w = _background_around(x, metal_m)
    diff = _gauss(x.astype(np.float32), 1.0) - bg
    comp, n = ndimage.label(metal_m)
    idx = np.arange(1, n + 1)
    judged = w >= 0.05
    num = ndimage.sum(np.where(judged, diff, 0.0), comp, idx)
    cnt = ndimage.sum(judged, comp, idx)
    contrast = np.abs(num / np.maximum(cnt, 1))
    keep = np.concatenate([[True], (contrast >= min_contrast) | (cnt == 0)])
    return keep[comp]


def _burn_text(rng, x):
    from PIL import Image, ImageDraw, ImageFont

    h, w = x.shape
    im = Image.fromarray((x * 255).astype(np.uint8))
    dr = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=int(rng.uniform(9, 22)))
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    val = 255 if rng.random() < 0.8 else 0
    for _ in range(rng.integers(1, 4)):
        txt = rng.choice(["L", "R", "AP", "LAT", "12:34:56", "kV 78 mA 2.1", "PATIENT", "FLUORO", "2024-06-11", "x1.5"])
        dr.text((int(rng.uniform(0, 0.8) * w), int(rng.uniform(0, 0.9) * h)), str(txt), fill=val, font=font)
    if rng.random() < 0.4:  # a ruler / crosshair marker
        c = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
        s = int(rng.uniform(5, 15))
        dr.line([(c[0] - s, c[1]), (c[0] + s, c[1])], fill=val)
        dr.line([(c[0], c[1] - s), (c[0], c[1] + s)], fill=val)
    mark = np.asarray(im, np.float32) / 255.0
    changed = np.asarray(im) != (x * 255).astype(np.uint8)
    return np.where(changed, mark, x)


def training_pair(bank, rng, out_px: int = CROP_PX, p_wrong_hint: float = 0.03):
    """Network input ``float32 [1, h, w]`` (via ``segmentation.preprocess``) and labels ``int64 [1, h, w]``."""
    image, labels, metal = render_sample(bank, rng, out_px=out_px)
    hint = metal if rng.random() >= p_wrong_hint else ("dark" if metal == "bright" else "bright")
    x = segmentation.preprocess(image.astype(np.float32), metal=hint)
    if rng.random() < 0.15:  # extra noise after windowing: other detectors, other renderers
        x = x + rng.normal(0, rng.uniform(0.01, 0.08), x.shape).astype(np.float32)
    return x[None].astype(np.float32), labels[None].astype(np.int64)


#: Crops per view rendered by the simulator's own renderer (:func:`renderer_pairs`): one
#: render costs about 0.4 s on a core, against about 0.07 s for a composited crop.
RENDERER_CROPS_PER_VIEW = 4

_CT_CENTER = None


def _ct_center_mm():
    global _CT_CENTER
    if _CT_CENTER is None:
        from . import ct as ctmod

        _CT_CENTER = np.asarray(ctmod.example_ct()[1].center_ras, float)
    return _CT_CENTER


def renderer_pairs(bank, rng, n_crops: int = RENDERER_CROPS_PER_VIEW, out_px: int = CROP_PX,
                   p_wrong_hint: float = 0.03):
    """Training pairs from one bank view rendered whole by the simulator (``xray.render_view``).

    A second image family beside :func:`render_sample`'s compositor: its physics and display
    (``xray.RenderParams.random``: detector response, dynamic range compression, edge
    enhancement, collimators, 3D distractors projected through the view) differ from the
    compositor's, and the network should not learn one renderer's look.  The whole view is
    windowed by ``segmentation.preprocess`` as inference windows it, area-averaged to the crop's
    pixel size (inference averages to ``segmentation.TARGET_MM_PER_PX``), then cropped.
    Labels: the renderer's, minus what lies outside the exposed field or shows no contrast
    (:func:`_visible_screws`).  Returns a list of ``(x float32 [1, h, w], labels int64 [1, h, w])``.
    """
    import torch
    import torch.nn.functional as F

    from . import geometry, xray

    nv = len(bank["views"])
    vi = int(rng.integers(nv))
    row = bank["views"][vi]
    K, R, t = geometry.decompose_projection(row[:12].reshape(3, 4))[:3]
    view = geometry.View(K=K, R=R, t=t, width=int(row[12]), height=int(row[13]), name="train")
    H, W = view.height, view.width
    cand = np.nonzero(bank["scr_view"] == vi)[0]
    n = int(rng.choice([0, 1, 2, 3, 4, 6, 8, 10, 12], p=[.06, .1, .1, .1, .14, .14, .12, .12, .12]))
    n = min(n, len(cand))
    chosen = rng.choice(cand, size=n, replace=False) if n else np.zeros(0, int)
    head, shaft = _bank_screw_paths(bank, chosen, (H, W))
    li = {"soft": torch.from_numpy(bank["soft"][vi].astype(np.float32)),
          "bone": torch.from_numpy(bank["bone"][vi].astype(np.float32))}
    params = xray.RenderParams.random(rng)
    dis = xray.random_distractors(rng, _ct_center_mm() + rng.normal(0, [20, 20, 40])) if rng.random() < 0.6 else None
    sv = xray.render_view(li, [], view, params, rng=rng, distractors=dis,
                          screw_paths=(torch.from_numpy(head), torch.from_numpy(shaft)))
    img = np.asarray(sv.image, np.float32)
    lab = np.asarray(sv.labels, np.uint8).copy()
    lab[~xray.field_mask(W, H, params)] = 0
    hint = sv.metal if rng.random() >= p_wrong_hint else ("dark" if sv.metal == "bright" else "bright")
    xw = segmentation.preprocess(img, metal=hint)
    lab[~_visible_screws(xw, lab)] = 0
    x = torch.from_numpy(xw)[None, None]
    lt = torch.from_numpy(lab.astype(np.float32))[None, None]
    px_mm_iso = float(bank["px_iso_mm"][vi])
    out = []
    for _ in range(n_crops):
        theta = _random_affine(rng, (H, W), out_px, bank["scr_head_px"][chosen] if n else None, px_mm_iso)
        zoom = float(np.hypot(theta[0, 0] * W, theta[1, 0] * H)) / out_px  # input px per crop px
        xs = x
        if zoom > 1.2:  # normalised coordinates do not depend on the grid's size: average, then sample
            xs = F.interpolate(x, size=(max(8, round(H / zoom)), max(8, round(W / zoom))), mode="area")
        grid = F.affine_grid(torch.from_numpy(theta)[None].float(), (1, 1, out_px, out_px), align_corners=False)
        xc = F.grid_sample(xs, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
        lc = F.grid_sample(lt, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0].numpy()
        if rng.random() < 0.15:  # as training_pair: extra noise after windowing
            xc = xc + rng.normal(0, rng.uniform(0.01, 0.08), xc.shape).astype(np.float32)
        out.append((xc[None].astype(np.float32), lc.round()[None].astype(np.int64)))
    return out


# =========================================================================== training loop
def _iterable_dataset_base():
    import torch

    return torch.utils.data.IterableDataset


class _PairStream(_iterable_dataset_base()):
    """Infinite iterable of training batches; each DataLoader worker gets its own seed."""

    def __init__(self, bank_path, seed, batch_size, crop_px=CROP_PX, p_renderer: float = 0.0):
        super().__init__()
        self.p_renderer = float(p_renderer)
        self.crop_px = int(crop_px)
        self.bank_path = str(bank_path)
        self.seed = seed
        self.batch_size = batch_size
        self.start = 0

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        torch.set_num_threads(1)
        with np.load(self.bank_path, allow_pickle=False) as z:
            bank = {k: z[k] for k in z.files}
        k = self.start
        while True:
            rng = np.random.default_rng([self.seed, wid, k])
            n_r = min(self.batch_size, round(self.batch_size * self.p_renderer))
            pairs = []
            while len(pairs) < n_r:
                pairs += renderer_pairs(bank, rng, out_px=self.crop_px)[: n_r - len(pairs)]
            pairs += [training_pair(bank, rng, out_px=self.crop_px) for _ in range(self.batch_size - n_r)]
            xs, ys = zip(*pairs)
            k += 1
            yield torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def train(out_dir, seed: int = DEFAULT_SEED, steps: int | None = None, minutes: float | None = None,
          device="cpu", resume: bool = False, batch_size: int = 16, lr: float = 3e-3, n_bank_views: int = 36,
          bank_path=None, workers: int = 1, threads: int = 1, log_every: int = 20, ckpt_every: int = 50,
          progress: bool = True, crop_px: int = CROP_PX, init=None, p_renderer: float = 0.0,
          precision: str = "auto") -> Path:
    """Train the U-Net; returns the path of the final weights (``out_dir/screw_unet.pt``).

    Stops after ``steps`` optimiser steps or ``minutes`` of wall time, whichever
    first (at least one must be given).  Checkpoints (model, optimiser, step,
    RNG seeds) go to ``out_dir/checkpoint.pt`` every ``ckpt_every`` steps and at the
    end; ``resume=True`` continues from it.  Logs: ``out_dir/log.csv`` and
    ``out_dir/log.jsonl`` every ``log_every`` steps.  ``p_renderer``: the fraction of each
    batch drawn from whole views rendered by the simulator (:func:`renderer_pairs`) instead of
    the compositor (:func:`render_sample`).  ``precision``: ``"auto"`` runs the network's
    forward pass under bfloat16 autocast where the hardware does bfloat16 (this CPU's
    AVX512-BF16 or AMX, a CUDA card that supports it), float32 elsewhere; the weights, the
    optimiser and the loss stay in float32.
    """
    import torch
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    if steps is None and minutes is None:
        raise ValueError("train: give --steps or --minutes (or both)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    bank_path = Path(bank_path) if bank_path else out / f"bank_train_{seed}.npz"
    load_or_build_bank(bank_path, n_bank_views, seed, split="train", device=device)

    if init is not None:
        model = segmentation.load_model(init).to(device)
        print(f"initialised from {init}")
    else:
        model = segmentation.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total_steps = int(steps) if steps is not None else 10_000_000
    # batch=True: Dice over the whole batch, so crops without screws neither dominate nor
    # reward predicting nothing (per-image Dice on empty crops collapsed a first run to background)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=True,
                         lambda_ce=1.0, lambda_dice=1.0)
    step, elapsed0 = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        st = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed0 = int(st["step"]), float(st["elapsed_s"])
        print(f"resumed from {ckpt} at step {step}")
    elif resume:
        print(f"no checkpoint at {ckpt}; starting fresh")

    if not 0.0 <= float(p_renderer) <= 1.0:
        raise ValueError(f"p_renderer must lie in [0, 1], got {p_renderer}")
    amp_dtype = training_dtype(device, precision)
    amp_device = "cuda" if str(device).startswith("cuda") else "cpu"
    stream = _PairStream(bank_path, seed, batch_size, crop_px, p_renderer=p_renderer)
    stream.start = step
    if workers > 0:
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4,
                                             persistent_workers=False)
    else:
        loader = stream
    t0 = time.time() - elapsed0
    budget_s = float(minutes) * 60 if minutes is not None else float("inf")

    def lr_at(step_, elapsed_):
        # warm-up, then cosine decay over whichever budget (steps or minutes) runs out first
        frac = max(step_ / total_steps if steps is not None else 0.0,
                   elapsed_ / budget_s if minutes is not None else 0.0)
        warm = min(1.0, (step_ + 1) / 100.0)
        return lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
    logf = open(out / "log.csv", "a", encoding="utf-8")
    if logf.tell() == 0:
        logf.write("step,elapsed_s,loss,dice_head,dice_shaft,lr\n")
    jl = open(out / "log.jsonl", "a", encoding="utf-8")
    run_loss, run_dh, run_ds, run_n = 0.0, [], [], 0
    bar = tqdm(total=total_steps if steps is not None else None, initial=step, desc="train", disable=not progress)

    def save_ckpt():
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "step": step, "elapsed_s": time.time() - t0, "seed": seed}, tmp)
        os.replace(tmp, ckpt)

    model.train()
    for xb, yb in loader:
        if step >= total_steps or time.time() - t0 > budget_s:
            break
        xb, yb = xb.to(device), yb.to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, time.time() - t0)
        with torch.autocast(amp_device, dtype=torch.bfloat16, enabled=amp_dtype == torch.bfloat16):
            logits = model(xb)
        logits = logits.float()
        loss = loss_fn(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        run_loss += float(loss.detach())
        run_n += 1
        with torch.no_grad():
            pred = logits.argmax(1).cpu().numpy()
            for p, t in zip(pred, yb[:, 0].cpu().numpy()):
                d = dice_per_class(p, t)
                if not math.isnan(d["head"]):
                    run_dh.append(d["head"])
                if not math.isnan(d["shaft"]):
                    run_ds.append(d["shaft"])
        bar.update(1)
        if step % log_every == 0:
            rec = {"step": step, "elapsed_s": round(time.time() - t0, 1), "loss": run_loss / run_n,
                   "dice_head": float(np.mean(run_dh)) if run_dh else float("nan"),
                   "dice_shaft": float(np.mean(run_ds)) if run_ds else float("nan"),
                   "lr": float(opt.param_groups[0]["lr"])}
            logf.write(",".join(str(rec[k]) for k in ("step", "elapsed_s", "loss", "dice_head", "dice_shaft", "lr")) + "\n")
            logf.flush()
            jl.write(json.dumps(rec) + "\n")
            jl.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", head=f"{rec['dice_head']:.2f}", shaft=f"{rec['dice_shaft']:.2f}")
            run_loss, run_dh, run_ds, run_n = 0.0, [], [], 0
        if step % ckpt_every == 0:
            save_ckpt()
    bar.close()
    save_ckpt()
    logf.close()
    jl.close()
    model.eval()
    meta = {"seed": seed, "steps": step, "elapsed_s": round(time.time() - t0, 1), "batch_size": batch_size,
            "crop_px": crop_px, "p_renderer": float(p_renderer), "precision": str(amp_dtype).replace("torch.", ""), "train_levels": list(TRAIN_LEVELS), "bank_views": n_bank_views, "lr": lr,
            "init": None if init is None else {"file": Path(init).name, "sha256": segmentation.sha256_of(init)}}
    weights = out / "screw_unet.pt"
    segmentation.save_weights(model.cpu(), weights, meta=meta)
    print(f"wrote {weights} after {step} steps")
    return weights


def training_dtype(device, precision: str = "auto"):
    """The dtype of the forward pass in :func:`train` for ``precision`` on ``device``.

    bfloat16 autocast nearly halves a CPU training step where the CPU does bfloat16 in hardware
    (measured here: 0.87 -> 0.50 s for 16 crops of 128x128 on one thread); it is float32 on CPUs
    that would emulate it.  Unlike float16, bfloat16 keeps float32's range, so no loss scaling.
    """
    import torch

    if precision not in segmentation.PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(segmentation.PRECISIONS)}")
    if precision != "auto":
        return getattr(torch, precision)
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if segmentation.cpu_has_bfloat16() else torch.float32


# =========================================================================== CLI
def add_train_segmentation_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (checkpoints, logs, screw_unet.pt)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED}, the shipped model's)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: until --minutes)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget in minutes")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bank-views", type=int, default=36, help="number of cached random views")
    parser.add_argument("--workers", type=int, default=1, help="data-generating worker processes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the training process (default 1: on a loaded 2-core machine "
                             "2 threads made each step ~10x slower, measured 3 s vs 0.2 s)")
    parser.add_argument("--init", default=None,
                        help="start from these weights (hash-checked) instead of a random initialisation")
    parser.add_argument("--crop", type=int, default=CROP_PX, help=f"training crop size in pixels (default {CROP_PX})")
    parser.add_argument("--p-renderer", type=float, default=0.0,
                        help="fraction of each batch from whole views rendered by the simulator (xray.render_view) "
                             "instead of the compositor (default 0: stages 1-5 of the shipped model)")
    parser.add_argument("--precision", default="auto", choices=segmentation.PRECISIONS,
                        help="arithmetic of the forward pass: auto (default) is bfloat16 autocast where the CPU "
                             "or GPU does it in hardware, float32 elsewhere; weights and optimiser stay float32")


def train_segmentation_command(args) -> int:
    if args.steps is None and args.minutes is None:
        raise ValueError("train-segmentation: give --steps N and/or --minutes M")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    train(args.out, seed=args.seed, steps=args.steps, minutes=args.minutes, device=args.device,
          resume=args.resume, batch_size=args.batch_size, lr=args.lr, n_bank_views=args.bank_views,
          workers=args.workers, threads=args.threads, crop_px=args.crop, init=args.init,
          p_renderer=args.p_renderer, precision=args.precision)
    return 0
