"""Benchmark of the screw segmentation U-Net on a fixed, held-out simulated test set.

Test set (``--seed``, default the training seed + ``training.TEST_SEED_OFFSET``: a seed
training never uses): 512x512 views from a *test bank* (``training.build_bank(split="test")``):
vertebral levels ``training.TEST_LEVELS``, C-arm angles only in ``training.TEST_LAO_BANDS_DEG``
and screw diameters ``training.TEST_DIAMETERS_MM``, all held out from training.  Images are
rendered by the simulator's own physics and display (``xray.render_view`` with
``xray.RenderParams.random`` and ``xray.random_distractors``), which training does not use
(training composites with its own physics/display code from the same cached line integrals):
a second renderer for the network.

Truth: the simulator's label map, set to background outside an image intensifier's circular
field (nothing is exposed there).

Groups (Dice per image and class, then median / mean / 5th percentile):
  main        N images (default 200), random C-arm looks, both polarities, metal hint given
  bright/dark the main images split by polarity
  auto        the first 60 main images segmented without the metal hint (polarity decided automatically)
  main60_without_local_pass  the first 60 main images without the local-window pass (``local=False``)
  noisy       40 images (--n-extra) at 40-120 photons per pixel (heavy quantum noise)
  lateral     40 lateral views with >= 4 screws (left and right screws overlap)
  empty       20 images without screws: screw pixels predicted (false positives)
Timing: inference per 512x512 image on 1 and 2 CPU threads (hint given, and automatic polarity),
and on CUDA when available; peak memory (max RSS).  Writes ``bench/results/segmentation.json``.

    python bench/bench_segmentation.py [--weights PATH] [--n-images 200] [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="weights file (default: the shipped model)")
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--bank-views", type=int, default=16)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "pedicle_seg_bench"),
                    help="folder for the cached test bank (line integrals)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "segmentation.json"))
    ap.add_argument("--build-only", action="store_true", help="only build the test bank")
    ap.add_argument("--timing-only", action="store_true",
                    help="only re-measure timing and memory, merged into the existing --out JSON")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the Dice runs (timing measures 1 and 2)")
    ap.add_argument("--n-extra", type=int, default=40, help="images in the noisy and lateral groups (empty: half)")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from PedicleScrewPoseLib import geometry, segmentation, training, xray
    from PedicleScrewPoseLib import ct as ctmod

    torch.set_num_threads(args.threads)
    seed = args.seed if args.seed is not None else training.DEFAULT_SEED + training.TEST_SEED_OFFSET
    bank_path = Path(args.cache) / f"bank_test_{seed}_{args.bank_views}.npz"
    bank = training.load_or_build_bank(bank_path, args.bank_views, seed, split="test")
    if args.build_only:
        print(f"test bank: {bank_path}")
        return 0
    _ct, labels = ctmod.example_ct()
    center = np.asarray(labels.center_ras, float)
    model = segmentation.load_model(args.weights)
    views = []
    for row in bank["views"]:
        K, R, t = geometry.decompose_projection(row[:12].reshape(3, 4))[:3]
        views.append(geometry.View(K=K, R=R, t=t, width=int(row[12]), height=int(row[13]), name="test"))
    lateral_views = [i for i, v in enumerate(views) if abs(v.R[2] @ np.array([1.0, 0, 0])) > 0.7]
    # Pixel size at the spine (mm/px), as the pipeline passes it from each view's geometry.
    from PedicleScrewPoseLib.correspondence import mm_per_px_at

    spacing = [float(mm_per_px_at(v, center)) for v in views]

    def render(rng, vi=None, n=None, params=None, visible=None, open_field=None):
        vi = int(rng.integers(len(views))) if vi is None else vi
        view = views[vi]
        cand = np.nonzero(bank["scr_view"] == vi)[0]
        if n is None:
            n = int(rng.choice([1, 2, 3, 4, 6, 8, 10, 12]))
        n = min(n, len(cand))
        chosen = rng.choice(cand, size=n, replace=False) if n else []
        H, W = view.height, view.width
        head = np.zeros((H, W), np.float32)
        shaft = np.zeros((H, W), np.float32)
        for k in chosen:
            (v0, v1, u0, u1), h, s = training._bank_screw(bank, int(k))
            head[v0:v1, u0:u1] += h
            shaft[v0:v1, u0:u1] += s
        li = {"soft": torch.from_numpy(bank["soft"][vi].astype(np.float32)),
              "bone": torch.from_numpy(bank["bone"][vi].astype(np.float32))}
        params = params or xray.RenderParams.random(rng)
        dis = xray.random_distractors(rng, center + rng.normal(0, [20, 20, 40])) if rng.random() < 0.5 else None
        sv = xray.render_view(li, [], view, params, rng=rng, distractors=dis,
                              screw_paths=(torch.from_numpy(head), torch.from_numpy(shaft)))
        # Outside an image intensifier's circle nothing is exposed: no screw can be seen there, so
        # the truth is background (the simulator's label map is geometric and ignores the field).
        lab = sv.labels.copy()
        lab[~xray.field_mask(W, H, params)] = 0
        if open_field is not None:
            # Truth restricted to the open field: also not behind a collimator shutter, which
            # passes 4% of the beam and leaves the display black there (the pose benchmark's
            # "exposed" screws use the same rule).
            lab_o = lab.copy()
            lab_o[~xray.unshuttered_mask(W, H, params, as_displayed=True)] = 0
            open_field.append(lab_o)
        if visible is not None:
            # Truth restricted to metal that shows in the displayed image (the training's own
            # criterion, training._metal_visible: >= 3% grey contrast against the anatomy around
            # it); saturated or flattened screws are invisible to anyone, network or reader.
            img = np.asarray(sv.image, np.float32)
            x01 = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
            vis = training._metal_visible(x01, head + shaft, np.zeros_like(head))
            lab_v = lab.copy()
            lab_v[~vis] = 0
            visible.append(lab_v)
        return sv.image, lab, sv.metal, spacing[vi]

    if args.timing_only:
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.is_file() else {}
        result["timing_per_512x512"] = _timing(model, render(np.random.default_rng(seed))[0])
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["timing_per_512x512"], indent=1))
        return 0

    groups: dict[str, list] = {k: [] for k in ("main", "main_visible_truth", "main_open_field_truth", "bright", "dark", "auto",
                                               "main60_without_local_pass", "noisy", "lateral")}
    empty_fp = []
    rng = np.random.default_rng(seed)
    main_imgs = []
    for i in tqdm(range(args.n_images), desc="main"):
        vis: list = []
        opened: list = []
        img, lab, metal, mm = render(rng, visible=vis, open_field=opened)
        p = segmentation.segment([img], model=model, metal=metal, mm_per_px=mm)[0]
        pred = segmentation.labels_from_probabilities(p)
        d = training.dice_per_class(pred, lab)
        groups["main_visible_truth"].append(training.dice_per_class(pred, vis[0]))
        groups["main_open_field_truth"].append(training.dice_per_class(pred, opened[0]))
        groups["main"].append(d)
        groups[metal].append(d)
        if i < min(60, args.n_images):
            main_imgs.append((img, lab, mm, metal))
    for img, lab, mm, _metal in tqdm(main_imgs, desc="auto"):
        p = segmentation.segment([img], model=model, metal=None, mm_per_px=mm)[0]
        groups["auto"].append(training.dice_per_class(segmentation.labels_from_probabilities(p), lab))
    for img, lab, mm, metal in tqdm(main_imgs, desc="without the local pass"):
        p = segmentation.segment([img], model=model, metal=metal, mm_per_px=mm, local=False)[0]
        groups["main60_without_local_pass"].append(
            training.dice_per_class(segmentation.labels_from_probabilities(p), lab))
    for _ in tqdm(range(args.n_extra), desc="noisy"):
        params = xray.RenderParams.random(rng)
        params.photons_per_pixel = float(rng.uniform(40, 120))
        img, lab, metal, mm = render(rng, params=params)
        p = segmentation.segment([img], model=model, metal=metal, mm_per_px=mm)[0]
        groups["noisy"].append(training.dice_per_class(segmentation.labels_from_probabilities(p), lab))
    for _ in tqdm(range(args.n_extra if lateral_views else 0), desc="lateral"):
        vi = int(rng.choice(lateral_views))
        img, lab, metal, mm = render(rng, vi=vi, n=int(rng.integers(4, 13)))
        p = segmentation.segment([img], model=model, metal=metal, mm_per_px=mm)[0]
        groups["lateral"].append(training.dice_per_class(segmentation.labels_from_probabilities(p), lab))
    for _ in tqdm(range(max(1, args.n_extra // 2)), desc="empty"):
        img, lab, metal, mm = render(rng, n=0)
        pred = segmentation.labels_from_probabilities(
            segmentation.segment([img], model=model, metal=metal, mm_per_px=mm)[0])
        empty_fp.append(int((pred > 0).sum()))

    timing = _timing(model, main_imgs[0][0] if main_imgs else render(np.random.default_rng(seed))[0])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def summary(ds):
        out = {"n_images": len(ds)}
        for c in ("head", "shaft"):
            v = np.array([d[c] for d in ds if not np.isnan(d[c])], float)
            out[c] = ({"median": float(np.median(v)), "mean": float(np.mean(v)), "p5": float(np.percentile(v, 5)),
                       "n": int(v.size)} if v.size else None)
        return out

    result = {
        "benchmark": "segmentation",
        "weights": str(args.weights or segmentation.WEIGHTS_PATH),
        "weights_sha256": segmentation.sha256_of(args.weights or segmentation.WEIGHTS_PATH),
        "test_seed": seed,
        "held_out": {"levels": list(training.TEST_LEVELS), "lao_bands_deg": [list(b) for b in training.TEST_LAO_BANDS_DEG],
                     "diameters_mm": list(training.TEST_DIAMETERS_MM)},
        "image_px": [int(views[0].height), int(views[0].width)],
        "network_input_mm_per_px": segmentation.TARGET_MM_PER_PX,
        "main_visible_truth": "the main images scored against truth without the metal that shows < 3% grey "
                              "contrast against the anatomy around it (training._metal_visible): saturated "
                              "or flattened screws that no reader could see",
        "main_open_field_truth": "the main images scored against truth without the screws' pixels behind a "
                                 "collimator shutter (4% of the beam; black on the display), as outside an "
                                 "image intensifier's circle",
        "renderer": "xray.render_view + RenderParams.random + random_distractors (not the training compositor)",
        "dice": {k: summary(v) for k, v in groups.items()},
        "empty_images": {"n": len(empty_fp), "screw_pixels_median": float(np.median(empty_fp)) if empty_fp else None,
                         "screw_pixels_max": int(max(empty_fp)) if empty_fp else None},
        "targets": {"mean_dice_shaft": 0.93, "mean_dice_head": 0.90, "cpu_s_per_512": 0.5},
        "timing_per_512x512": timing,
        "peak_rss_mb": peak_rss_mb,
        "command": "python bench/bench_segmentation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(json.dumps({k: result[k] for k in ("dice", "empty_images", "timing_per_512x512", "peak_rss_mb")}, indent=1))
    return 0


def _cpu_name() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _timing(model, image, repeats: int = 7) -> dict:
    """Seconds per 512x512 image (whole ``segment`` call: preprocessing, network, resizing)."""
    import torch

    from PedicleScrewPoseLib import segmentation

    x = np.asarray(image)
    before = torch.get_num_threads()
    timing = {"note": "2 CPU cores; load_average_1min: the machine's load when the timing started (1 or less: idle); "
                      "precision: what segment's default precision='auto' runs the network in on this CPU "
                      "(the *_float32 rows force float32)",
              "precision": segmentation.precision_name("cpu"),
              "cpu": _cpu_name(),
              "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for label, hint, local, precision in (
                ("hint", "bright", True, None), ("auto_polarity", None, True, None),
                ("hint_without_local_pass", "bright", False, None),
                ("auto_polarity_without_local_pass", None, False, None),
                ("hint_float32", "bright", True, "float32"), ("auto_polarity_float32", None, True, "float32")):
            segmentation.segment([x], model=model, metal=hint, local=local, precision=precision)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                segmentation.segment([x], model=model, metal=hint, local=local, precision=precision)
                ts.append(time.perf_counter() - t0)
            timing[f"cpu_{threads}thread_{label}_s"] = {"median": float(np.median(ts)), "min": float(np.min(ts))}
    torch.set_num_threads(before)
    if torch.cuda.is_available():
        m = model.to("cuda")
        segmentation.segment([x], model=m, metal="bright", device="cuda")
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            segmentation.segment([x], model=m, metal="bright", device="cuda")
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        timing["cuda_hint_s"] = {"median": float(np.median(ts))}
    else:
        timing["cuda_hint_s"] = None
    return timing


if __name__ == "__main__":
    sys.exit(main())
