"""Simulated cases: a CT, planned screws, C-arm views around them, X-rays and truth (CASE_FORMAT.md).

``pedicle-screw-pose simulate --out DIR [--n-cases N] [--seed S] [--views ap,lat,obl] ...``
writes ``DIR/case_000``, ``DIR/case_001``, ... each a case folder (``case.json``, one
PNG per view) with its truth in ``truth/`` (``truth.json`` and ``<view>_labels.png``).
The same seed gives the same bytes.

View names: ``ap`` (LAO 0), ``pa`` (LAO 180), ``lat`` (LAO 90), ``rlat`` (LAO -90),
``obl`` (LAO +-15..30, random side), ``laoNN`` / ``raoNN`` (LAO +-NN degrees), each
with a small random jitter of the C-arm angles (and, for realistic cases, of the
source/detector distances, detector size and principal point).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import geometry

__all__ = ["simulate_case", "make_view", "add_simulate_arguments", "simulate_command", "CASE_DISTRACTOR_KINDS"]

# Non-screw metal put into evaluation cases (3D, consistent across views). Rods and
# calibration phantoms are left to training: they change what the pipeline must solve.
CASE_DISTRACTOR_KINDS = ("kwire", "ecg", "table", "clip", "retractor")


def make_view(name: str, isocenter_mm, rng, image_size: int = 512, realistic: bool = True) -> geometry.View:
    """A C-arm view named ``name`` (see the module doc) around ``isocenter_mm`` (RAS mm), jittered by ``rng``."""
    key = name.strip().lower()
    jitter = 2.0
    if key == "ap":
        lao = 0.0
    elif key == "pa":
        lao = 180.0
    elif key in ("lat", "llat"):
        lao = 90.0
    elif key == "rlat":
        lao = -90.0
    elif re.fullmatch(r"obl\d*", key):
        lao = float(rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 30.0))
        jitter = 0.0
    elif m := re.fullmatch(r"(lao|rao)(\d+(?:\.\d+)?)", key):
        lao = float(m.group(2)) * (1.0 if m.group(1) == "lao" else -1.0)
    else:
        raise ValueError(f"unknown view name {name!r}: use ap, pa, lat, rlat, obl, obl2, laoNN or raoNN")
    lao += float(rng.uniform(-jitter, jitter))
    cranial = float(rng.uniform(-3.0, 3.0))
    if realistic:
        sdd = float(rng.uniform(950.0, 1150.0))
        sid = float(sdd * rng.uniform(0.55, 0.68))
        detector_mm = float(rng.uniform(230.0, 310.0))
        offset = tuple(float(x) for x in rng.uniform(-4.0, 4.0, 2))
        roll = float(rng.uniform(-2.0, 2.0))
    else:
        sdd, sid, detector_mm, offset, roll = 1000.0, 600.0, 300.0, (0.0, 0.0), 0.0
    return geometry.carm_view(name.strip().upper(), isocenter_mm=isocenter_mm, lao_deg=lao, cranial_deg=cranial,
                              sid_mm=sid, sdd_mm=sdd, pixel_mm=detector_mm / image_size, width=image_size,
                              height=image_size, principal_offset_px=offset, detector_roll_deg=roll)


def _levels_present(labels, candidates=("T10", "T11", "T12", "L1", "L2", "L3")):
    names = set(getattr(labels, "names", {}).values())
    present = []
    for lv in candidates:
        if lv in names:
            value = [k for k, v in labels.names.items() if v == lv][0]
            if np.any(labels.array == value):
                present.append(lv)
    return present


def simulate_case(out_dir, ct=None, labels=None, seed: int = 0, view_names=("ap", "lat"), levels=None,
                  n_levels=None, params=None, realistic: bool = True, image_size: int = 512,
                  misplacement_rate: float = 0.2, distractors: bool | None = None, with_ct: bool = False,
                  device: str = "cpu", cache: dict | None = None, extend_mm: float = 80.0) -> dict:
    """Simulate one case into ``out_dir`` (refuses a non-empty folder); returns a summary dict.

    ``ct`` (HU ``ct.Volume``) and ``labels`` (``ct.LabelVolume`` with vertebra names) default to
    the example CT. ``levels``: vertebrae to instrument (bilateral); default a random run of
    ``n_levels`` (default 4-6) consecutive levels among T10..L3 present in ``labels``.
    ``params``: a ``xray.RenderParams`` for every view; default ``RenderParams.random`` (one
    C-arm per case: field, polarity, bit depth and processing shared, exposure varying by
    view) when ``realistic``, else ``RenderParams.ideal()``. No lens distortion either way, so
    the written ``P`` is exact. ``misplacement_rate``: probability that a screw is misplaced
    (1.5-6 mm breach). ``distractors``: non-screw metal (default: when ``realistic``).
    ``with_ct``: copy the CT and label files into the case. ``extend_mm``: mirror the CT beyond
    its superior/inferior ends (see ``xray.prepare_ct``).
    """
    from . import io, planning, xray

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    if ct is None or labels is None:
        if ct is not None or labels is not None:
            raise ValueError("simulate_case: give both ct and labels, or neither (the example CT)")
        from . import ct as ctmod

        ct, labels = ctmod.example_ct()
    rng = np.random.default_rng(seed)
    if levels is None:
        present = _levels_present(labels)
        if not present:
            raise ValueError(f"{getattr(labels, 'path', 'labels')}: no vertebra named T10..L3 in the label map")
        n = int(n_levels) if n_levels is not None else int(rng.integers(4, 7))
        n = max(1, min(n, len(present)))
        start = int(rng.integers(0, len(present) - n + 1))
        levels = tuple(present[start:start + n])
    screws = planning.plan_screws(labels, ct, levels=tuple(levels), rng=rng,
                                  misplacement=float(misplacement_rate) if misplacement_rate else None)
    if not screws:
        raise ValueError(f"simulate_case: no screw could be planned at levels {list(levels)}")
    mids = np.array([(s.entry_mm + s.tip_mm) / 2 for s in screws])
    iso = mids.mean(axis=0) + rng.normal(0.0, 5.0, 3)

    if distractors is None:
        distractors = realistic
    dis = []
    if distractors:
        dis = xray.random_distractors(rng, iso, screws=screws, n=int(rng.integers(0, 4)), kinds=CASE_DISTRACTOR_KINDS)

    base = params
    if base is None:
        base = xray.RenderParams.random(rng, distortion=False) if realistic else xray.RenderParams.ideal()
    cache = {} if cache is None else cache
    key = ("prepared-ext", id(ct), float(extend_mm))
    if key not in cache or cache[key][0] is not ct:
        cache[key] = (ct, xray.prepare_ct(ct, device=device, extend_mm=extend_mm))
    pct = cache[key][1]

    views, images, label_maps, per_view = [], [], {}, []
    for name in view_names:
        view = make_view(name, iso, rng, image_size=image_size, realistic=realistic)
        p = base
        if params is None and realistic:
            # One C-arm, exposure set per view by its automatic exposure control.
            p = xray.RenderParams(**{**base.to_dict(), "collimator": base.collimator})
            p.kvp = float(np.clip(base.kvp + rng.uniform(-8, 8) + (8 if "LAT" in view.name else 0), 55, 125))
            p.photons_per_pixel = float(base.photons_per_pixel * np.exp(rng.uniform(-0.3, 0.3)))
            p.scatter_fraction = float(base.scatter_fraction * (1.5 if "LAT" in view.name else 1.0))
        sv = xray.simulate_view(pct, screws, view, p, rng=rng, device=device, cache=cache, distractors=dis)
        view = sv.view
        views.append(view)
        images.append(sv.image)
        label_maps[view.name] = sv.labels
        per_view.append({"name": view.name, "params": p.to_dict()})

    implants = [{"diameter_mm": float(s.spec.diameter_mm), "length_mm": float(s.spec.length_mm)} for s in screws]
    order = rng.permutation(len(implants))
    implants = [implants[i] for i in order]
    ct_path = labels_path = None
    label_names = None
    if with_ct:
        ct_path, labels_path = getattr(ct, "path", None), getattr(labels, "path", None)
        if not ct_path or not labels_path:
            raise ValueError("simulate_case: with_ct needs a CT and labels read from files (their .path)")
        label_names = {int(k): v for k, v in labels.names.items()}
    extra = {"simulator": {"seed": int(seed) if np.isscalar(seed) else None, "realistic": bool(realistic),
                           "levels": list(levels), "distractors": sorted({d.kind for d in dis}),
                           "lens_distortion": False}}
    io.write_case(out_dir, views, images, implants=implants, ct=ct_path, labels=labels_path,
                  label_names=label_names, extra=extra)
    io.write_truth(out_dir, screws, label_maps,
                   extra={"views": per_view, "isocenter_mm": [float(x) for x in iso],
                          "distractors": [{"kind": d.kind, "material": d.material} for d in dis]})
    return {"case_dir": str(out_dir), "n_screws": len(screws), "levels": list(levels),
            "views": [v.name for v in views]}


# =========================================================================== CLI
def add_simulate_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder for the case folders (case_000, case_001, ...)")
    parser.add_argument("--n-cases", type=int, default=1, help="number of cases (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case; case i uses seed + i")
    parser.add_argument("--views", default="ap,lat", help="comma-separated views: ap, pa, lat, rlat, obl, laoNN, raoNN")
    parser.add_argument("--ct", help="CT volume (NIfTI/NRRD/MHA/DICOM folder); default: the example CT")
    parser.add_argument("--labels", help="vertebra label map on the CT's grid (needed with --ct)")
    parser.add_argument("--levels", help="comma-separated levels to instrument, e.g. T12,L1,L2 (default: random run)")
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels (default 512)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--realistic", dest="realistic", action="store_true", default=True,
                      help="random realistic C-arm, noise, processing and distractors (default)")
    mode.add_argument("--ideal", dest="realistic", action="store_false",
                      help="noise-free monochromatic images, fixed C-arm geometry, no distractors")
    parser.add_argument("--misplacement-rate", type=float, default=0.2, help="probability a screw is misplaced")
    parser.add_argument("--with-ct", action="store_true", help="copy the CT and labels into each case")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")


def simulate_command(args) -> int:
    from tqdm import tqdm

    from . import ct as ctmod

    if args.n_cases < 1:
        raise ValueError(f"--n-cases must be at least 1, got {args.n_cases}")
    if not 16 <= args.size <= 4096:
        raise ValueError(f"--size must be within 16..4096 pixels, got {args.size}")
    views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    if len(views) < 1:
        raise ValueError("--views: give at least one view")
    rng = np.random.default_rng(0)
    for v in views:
        make_view(v, (0, 0, 0), rng)          # fails early on an unknown name
    if bool(args.ct) != bool(args.labels):
        raise ValueError("--ct and --labels go together (screws are planned from the vertebra labels)")
    if args.ct:
        for p in (args.ct, args.labels):
            if not Path(p).exists():
                raise FileNotFoundError(f"{p} does not exist")
        ct = ctmod.load_volume(args.ct)
        labels = ctmod.load_labels(args.labels)
    else:
        ct, labels = ctmod.example_ct()
    out = Path(args.out)
    width = max(3, len(str(args.n_cases - 1)))
    dirs = [out / f"case_{i:0{width}d}" for i in range(args.n_cases)]
    for d in dirs:
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise FileExistsError(f"{d} exists and is not empty; refusing to overwrite it (choose another --out)")
    levels = tuple(s.strip() for s in args.levels.split(",")) if args.levels else None
    cache: dict = {}
    for i, d in enumerate(tqdm(dirs, desc="simulating cases", unit="case")):
        simulate_case(d, ct, labels, seed=args.seed + i, view_names=views, levels=levels,
                      realistic=args.realistic, image_size=args.size, misplacement_rate=args.misplacement_rate,
                      with_ct=args.with_ct, device=args.device, cache=cache)
    print(f"wrote {len(dirs)} case(s) to {out}")
    return 0
