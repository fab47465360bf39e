"""Pose benchmark: detection and pose errors over a fixed simulated test set, and run time.

    .venv/bin/python bench/bench_pose.py [--n-cases 30] [--modes truth,network] [--max-minutes M]

* Test set: ``--n-cases`` cases simulated from the example CT with the realistic simulator
  (``simulate.simulate_case``, AP + lateral + one oblique, 512x512, 4-6 bilateral levels),
  seeds ``SEED_BASE + i``: a range the segmentation training never uses (training draws
  from ``training.DEFAULT_SEED`` and ``+ TEST_SEED_OFFSET``).  Cached under ``--cache``
  (default ``bench/.cache/pose``, not committed); generation and evaluation are resumable:
  a rerun skips what is done, so ``--max-minutes`` can split the work over several calls.
* Each case runs with true label maps (one-hot: geometry error alone) and with the shipped
  network (``--modes``), each on AP + lateral and on AP + lateral + oblique.  ``--weights``
  runs other segmentation weights instead (a candidate model); the network results cached for
  other weights (told apart by their SHA-256) are rerun, the true-label results are kept.
* Metrics (evaluation.py): recall, precision, angle / entry / tip / segment errors with
  median, mean, p95 and max.  With the network, also the per-view Dice of the network's label map and of
  the one ``run`` writes (``pipeline.label_maps``: with the fitted screws' silhouettes), under
  ``segmentation_dice``.  Beside the recall over all true screws (the headline), the
  recall over the screws exposed in every view used (``exposed_in_every_view``): a collimator
  shutter passes 4% of the beam, so a screw behind one in one of two views is all but hidden
  there (true label maps still show it, and the geometry then finds about half of them).
* ``--seed-base B --cache DIR --out F``: another set of cases (seeds ``B + i``), for tuning the
  pipeline apart from the test set (``TUNING_SEED_BASE`` is the set used so far).
* Run time per stage of ``pipeline.run_case`` for an 8-screw, 2-view 512x512 case
  (network included), median of 3 runs, on this machine's CPU (2 threads) and on CUDA
  when available.

* ``--screw-design low-profile``: the same benchmark on cases whose screws are of another
  design than the model the refinement starts from (a low-profile head of about 9 x 8.6 mm
  against ~11.5 x 13.8 mm, a deeper thread, a tip one diameter long), seeds
  ``OTHER_DESIGN_SEED_BASE + i``: how much the pose depends on knowing the screw's make.
* ``--screw-design tall-blunt``: a third design, the other way from ours (a tulip of about
  13 x 16 mm, a blunt tip of 0.35 diameters, a shallow thread), seeds ``THIRD_DESIGN_SEED_BASE + i``:
  so that the pipeline is not tuned to one foreign design.
  The segmentation network saw heads and tips of 0.75-1.3x our proportions in training.

* ``--renderer voxel``: cases from a second, plain renderer (``bench/voxel_render.py``: screws as
  binary voxels, one energy, Poisson noise, ``-log`` or linear-intensity display, the metal hint in
  half of the cases), seeds ``VOXEL_RENDERER_SEED_BASE + i``, with any ``--screw-design``: how the
  pipeline fares on images that neither the training compositor nor the simulator made.
  ``--renderer voxel-raw``: the same, with every view a raw detector image (linear in intensity,
  metal dark, 16 bit) and no metal hint, seeds ``VOXEL_RAW_SEED_BASE + i``.
  ``--renderer voxel-cannulated``: the scenes of ``--renderer voxel``, every screw bored along its
  axis (2 mm), as cannulated screws are.

Writes ``bench/results/pose.json`` (``pose_low_profile.json``, ``pose_tall_blunt.json`` for the
other designs, ``pose_voxel.json``, ``pose_voxel_low_profile.json``, ``pose_voxel_raw.json`` and
``pose_voxel_cannulated.json`` for the second renderer).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED_BASE = 91_000_000
OTHER_DESIGN_SEED_BASE = 93_000_000
THIRD_DESIGN_SEED_BASE = 94_000_000
#: ``--renderer voxel`` (bench/voxel_render.py), whatever the design.
VOXEL_RENDERER_SEED_BASE = 99_000_000
#: ``--renderer voxel-raw``: the same renderer, every view as a raw detector image (linear in
#: intensity, metal dark, 16 bit) and no metal hint.
VOXEL_RAW_SEED_BASE = 99_800_000
#: ``--renderer voxel-prone``: the same renderer with the operating room's C-arm geometry
#: (``voxel_render.prone_view``: patient prone, source under the table, wider tilts, a 4:5 flat panel).
VOXEL_PRONE_SEED_BASE = 99_700_000
#: Settings of bench/voxel_render.py that each renderer choice fixes, and its seeds.
#: ``--renderer voxel-cannulated``: the scenes of ``--renderer voxel`` (the same seeds), with a
#: channel of 2 mm bored along every screw's axis, as cannulated screws have.
RENDERER_SETTINGS = {"ours": None, "voxel": {}, "voxel-raw": {"metal": "dark", "bits": 16, "hint": False},
                     "voxel-cannulated": {"cannula_mm": 2.0}, "voxel-prone": {"geometry": "prone"}}
RENDERER_SEED_BASES = {"voxel": VOXEL_RENDERER_SEED_BASE, "voxel-raw": VOXEL_RAW_SEED_BASE,
                       "voxel-cannulated": VOXEL_RENDERER_SEED_BASE, "voxel-prone": VOXEL_PRONE_SEED_BASE}
#: Cases for tuning the pipeline's gates, kept apart from the test set (``--seed-base``).
TUNING_SEED_BASE = 95_000_000
VIEW_NAMES = ("ap", "lat", "obl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cases", type=int, default=30)
    ap.add_argument("--screw-design", choices=("ours", "low-profile", "tall-blunt"), default="ours")
    ap.add_argument("--renderer", choices=tuple(RENDERER_SETTINGS), default="ours",
                    help="voxel: the plain second renderer of bench/voxel_render.py (voxel screws, one energy); "
                         "voxel-raw: the same with every view a raw detector image (linear in intensity, metal dark, "
                         "16 bit) and no metal hint; voxel-cannulated: voxel's scenes with cannulated screws "
                         "(2 mm bore); voxel-prone: voxel with the operating room's C-arm geometry (patient prone, "
                         "source under the table, wider tilts, a 4:5 flat panel)")
    ap.add_argument("--cache", default=None, help="default bench/.cache/pose[-RENDERER][-DESIGN]")
    ap.add_argument("--out", default=None, help="default bench/results/pose[_RENDERER][_DESIGN].json")
    ap.add_argument("--modes", default="truth,network")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--weights", default=None,
                    help="segmentation weights for the network mode (default: the shipped model)")
    ap.add_argument("--seed-base", type=int, default=None,
                    help="another set of cases (seeds SEED_BASE + i for this SEED_BASE): a tuning set apart from the test set "
                         f"(the test sets' bases are {SEED_BASE}, {OTHER_DESIGN_SEED_BASE} and {THIRD_DESIGN_SEED_BASE}; "
                         f"tuning used {TUNING_SEED_BASE}); give it its own --cache and --out")
    args = ap.parse_args(argv)
    if args.seed_base is not None and (args.cache is None or args.out is None):
        ap.error("--seed-base needs its own --cache and --out (the default ones hold the test set)")

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from tqdm import tqdm

    from PedicleScrewPoseLib import evaluation, io, pipeline

    t_stop = time.time() + args.max_minutes * 60 if args.max_minutes else None
    tags = ([args.renderer] if args.renderer != "ours" else []) + (
        [args.screw_design] if args.screw_design != "ours" else [])
    cache = Path(args.cache or HERE / ".cache" / "-".join(["pose"] + tags))
    args.out = args.out or str(HERE / "results" / ("_".join(["pose"] + tags).replace("-", "_") + ".json"))
    seed_base = {"ours": SEED_BASE, "low-profile": OTHER_DESIGN_SEED_BASE,
                 "tall-blunt": THIRD_DESIGN_SEED_BASE}[args.screw_design]
    seed_base = RENDERER_SEED_BASES.get(args.renderer, seed_base)
    if args.seed_base is not None:
        seed_base = args.seed_base
    cases_dir = cache / "cases"
    evals_dir = cache / "evals"
    cases_dir.mkdir(parents=True, exist_ok=True)
    evals_dir.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from PedicleScrewPoseLib import segmentation

    weights = Path(args.weights) if args.weights else Path(segmentation.WEIGHTS_PATH)
    weights_sha = segmentation.sha256_of(weights) if "network" in modes else None
    # The network's arithmetic on this machine (segment's default precision): results made in
    # another one are rerun, like those of other weights.
    precision = segmentation.precision_name(args.device)

    # 1. The test set.
    names = [f"case{i:03d}" for i in range(args.n_cases)]
    todo = [n for n in names if not (cases_dir / n / "truth" / "truth.json").exists()]
    if todo:
        from PedicleScrewPoseLib import ct as ctmod, simulate

        ct, labels = ctmod.example_ct()
        sim_cache: dict = {}
        for n in tqdm(todo, desc="simulating test cases"):
            if t_stop and time.time() > t_stop:
                print("time limit reached while simulating; rerun to continue")
                return 3
            i = int(n[4:])
            d = cases_dir / n
            if d.exists():
                import shutil

                shutil.rmtree(d)  # an interrupted case
            with _screw_design(args.screw_design):
                if args.renderer != "ours":
                    import voxel_render

                    voxel_render.simulate_case(d, ct, labels, seed=seed_base + i, view_names=VIEW_NAMES,
                                               image_size=args.image_size, cache=sim_cache,
                                               **RENDERER_SETTINGS[args.renderer])
                else:
                    simulate.simulate_case(d, ct, labels, seed=seed_base + i, view_names=VIEW_NAMES,
                                           image_size=args.image_size, realistic=True, device=args.device,
                                           cache=sim_cache)

    # 2. Runs and evaluations.
    model = None
    for n in tqdm(names, desc="running the pipeline"):
        out = evals_dir / f"{n}.json"
        done = json.loads(out.read_text()) if out.exists() else {}
        _drop_other_weights(done, weights_sha, precision)
        if all(_done(done, m, k) for m in modes for k in ("2views", "3views")):
            continue
        if t_stop and time.time() > t_stop:
            print("time limit reached while evaluating; summarising the cases done so far (rerun to continue)")
            break
        case = io.read_case(cases_dir / n)
        truth = io.read_truth(cases_dir / n)
        for mode in modes:
            if all(_done(done, mode, k) for k in ("2views", "3views")):
                continue  # evaluated before (delete the case's file in evals/ after changing the code)
            if mode == "truth":
                probs = [pipeline.one_hot(io.read_truth_labels(case.root, v.name)) for v in case.views]
                seg_s = 0.0
            elif mode == "network":
                model = model or segmentation.load_model(weights, device=args.device)
                done["network_weights_sha256"] = weights_sha
                done["network_precision"] = precision
                t = time.perf_counter()
                probs = segmentation.segment_views(case.views, case.images, model=model, device=args.device)
                seg_s = time.perf_counter() - t
            else:
                raise ValueError(f"unknown mode {mode!r}")
            for k, nv in (("2views", 2), ("3views", 3)):
                sub = dataclasses.replace(case, views=case.views[:nv], images=case.images[:nv])
                res, labels = pipeline.run_case(sub, probabilities=probs[:nv], device=args.device, assess=False,
                                                with_labels=True)
                ev = evaluation.evaluate(res, truth)
                if mode == "network":
                    # Dice of the network's label map and of the one run writes (with the fit).
                    ev["segmentation"] = {}
                    for v, p, lab in zip(sub.views, probs, labels):
                        t_lab = io.read_truth_labels(case.root, v.name)
                        ev["segmentation"][v.name] = {
                            "network": evaluation.dice_per_class(segmentation.labels_from_probabilities(p), t_lab),
                            "run": evaluation.dice_per_class(lab, t_lab)}
                ev["timing_s"] = res["timing_s"]
                ev["timing_s"]["segmentation"] = seg_s * nv / len(case.views)
                ev["unmatched"] = res["unmatched"]
                # The fitted screws themselves, so that bench_assessment.py can grade the pipeline's
                # own poses against truth.json's breach (its end-to-end figure).
                ev["screws"] = [{key: s[key] for key in RESULT_SCREW_KEYS} for s in res["screws"]]
                done[f"{mode}/{k}"] = ev
        io.write_json_atomic(out, done)

    # 3. Summaries.
    report = {
        "benchmark": "pose",
        "command": "python bench/bench_pose.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "weights": None if weights_sha is None else {"file": weights.name, "sha256": weights_sha,
                                                     "precision": precision},
        "test_set": {"n_cases": len(names), "seed_base": seed_base, "views": list(VIEW_NAMES),
                     "screw_design": args.screw_design,
                     "image_size": args.image_size,
                     "simulator": ("simulate.simulate_case(realistic=True)" if args.renderer == "ours" else
                                   "bench/voxel_render.py (voxel screws, one energy, log or linear display)"),
                     "renderer_settings": RENDERER_SETTINGS[args.renderer],
                     "cases": str(cases_dir),
                     # The renderers' float sums run in another order with another thread count or
                     # CPU, so the same seeds can give images that differ in the last bits and flip a
                     # marginal screw: this hash says whether two runs saw the same images.
                     "files_sha256": _cases_sha256(cases_dir, names)},
        "targets": {"recall": 0.98, "precision": 0.98, "angle_deg_median": 1.0, "segment_mm_median": 1.0,
                    "angle_deg_p95": 2.0, "segment_mm_p95": 2.0, "run_s_8_screws_2_views_512": 10.0},
        "results": {},
    }
    all_evals = {n: json.loads((evals_dir / f"{n}.json").read_text()) for n in names
                 if (evals_dir / f"{n}.json").exists()}
    for e in all_evals.values():  # never summarise another model's network results
        _drop_other_weights(e, weights_sha, precision)
    for mode in modes:
        for k in ("2views", "3views"):
            evs = [e[f"{mode}/{k}"] for e in all_evals.values() if f"{mode}/{k}" in e]
            if not evs:
                continue
            s = evaluation.summarize(evs)
            reasons: dict = {}
            for e in evs:
                for u in e.get("unmatched", []):
                    reasons[u["reason"]] = reasons.get(u["reason"], 0) + 1
            s["unmatched_reasons"] = reasons
            s["exposed_in_every_view"] = _recall_of_exposed(cases_dir, all_evals, f"{mode}/{k}",
                                                            2 if k == "2views" else 3)
            s["worst_cases"] = sorted(
                ({"case": n, "recall": e[f"{mode}/{k}"]["recall"], "precision": e[f"{mode}/{k}"]["precision"],
                  "segment_mm_max": e[f"{mode}/{k}"]["summary"]["segment_mm"]["max"]}
                 for n, e in all_evals.items() if f"{mode}/{k}" in e),
                key=lambda r: (r["recall"] + r["precision"], -(r["segment_mm_max"] or 0)))[:5]
            if mode == "network":
                s["segmentation_dice"] = _dice_by_view(evs)
            report["results"][f"{mode}/{k}"] = s
            print(evaluation.format_summary(s, title=f"\n== {mode} labels, {k} =="))
            for name, d in s.get("segmentation_dice", {}).items():
                means = {w: " / ".join("-" if d[w][c]["mean"] is None else f"{d[w][c]['mean']:.3f}"
                                       for c in ("head", "shaft")) for w in ("network", "run")}
                print(f"{name} mean Dice head / shaft: network's label map {means['network']}, run's {means['run']}")
            ex = s["exposed_in_every_view"]
            print(f"screws exposed in every view: {ex['n_truth']}, recall {ex['recall']:.3f}; "
                  f"not exposed in some view: {ex['n_not_exposed']} ({ex['n_not_exposed_found']} found)")

    # 4. Run time of the whole run for an 8-screw 2-view case.
    if not args.skip_timing:
        report["timing"] = _timing(cases_dir, names, args.device, weights)
        if args.device == "cpu" and torch.cuda.is_available():
            report["timing_cuda"] = _timing(cases_dir, names, "cuda", weights)
    io.write_json_atomic(args.out, report)
    print(f"-> {args.out}")
    return 0


#: What an evaluation keeps of each result screw (CASE_FORMAT; the per-view pixels are left out).
RESULT_SCREW_KEYS = ("id", "entry_mm", "tip_mm", "diameter_mm", "length_mm", "confidence")


def _done(evals: dict, mode: str, k: str) -> bool:
    """Whether a case's evaluation of ``mode`` on ``k`` views is cached (the network's with its
    label maps' Dice, which older caches lack)."""
    ev = evals.get(f"{mode}/{k}")
    return ev is not None and (mode != "network" or "segmentation" in ev)


def _dice_by_view(evs) -> dict:
    """Per view name and label map (the network's; the one run writes): the per-image Dice of
    head and shaft summarised (median / mean / p5, images with a class in neither map left out)."""
    from PedicleScrewPoseLib import evaluation

    out: dict = {}
    names = sorted({v for e in evs for v in e.get("segmentation", {})})
    for name in names:
        out[name] = {}
        for which in ("network", "run"):
            per = [{"views": {name: e["segmentation"][name][which]}} for e in evs if name in e.get("segmentation", {})]
            out[name][which] = evaluation.summarize_dice(per)
    return out


#: A screw counts as exposed in a view when at least this fraction of its shaft (5-85% of the
#: way from entry to tip) projects inside the image, inside the detector's field and outside the
#: collimator shutters (which pass 4% of the beam: a screw behind them is all but invisible).
EXPOSED_FRACTION = 0.5


def _exposed_fraction(view, params: dict, entry_mm, tip_mm) -> float:
    """Fraction of a screw's shaft that projects into the open field of ``view``
    (``params``: the view's render parameters in truth.json)."""
    from PedicleScrewPoseLib import geometry, xray

    s = np.linspace(0.05, 0.85, 12)[:, None]
    uv = geometry.project(view.P, np.asarray(entry_mm, float)[None] * (1 - s) + np.asarray(tip_mm, float)[None] * s)
    W, H = view.width, view.height
    ok = (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & (uv[:, 0] <= W - 1) & (uv[:, 1] <= H - 1)
    ui = np.clip(np.round(uv[:, 0]).astype(int), 0, W - 1)
    vi = np.clip(np.round(uv[:, 1]).astype(int), 0, H - 1)
    p = xray.RenderParams(field=params.get("field", "square"), field_radius=params.get("field_radius", 0.49),
                          collimator=tuple(params["collimator"]) if params.get("collimator") else None)
    ok &= (xray.field_mask(W, H, p) & xray.unshuttered_mask(W, H, p))[vi, ui]
    return float(ok.mean())


def _cases_sha256(cases_dir, names) -> str:
    """SHA-256 over every file of the named cases (their relative paths and bytes, sorted)."""
    h = hashlib.sha256()
    for n in sorted(names):
        for f in sorted(p for p in (cases_dir / n).rglob("*") if p.is_file()):
            h.update(str(f.relative_to(cases_dir)).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _recall_of_exposed(cases_dir, all_evals: dict, key: str, n_views: int) -> dict:
    """Recall over the true screws exposed (:data:`EXPOSED_FRACTION`) in every one of the first
    ``n_views`` views, and how many true screws are not (behind a collimator shutter or outside
    the field in some view, where the image all but hides them).  Reported beside the recall over
    all screws, which stays the headline."""
    from PedicleScrewPoseLib import io

    n_exposed = n_paired = n_hidden = n_hidden_paired = 0
    for name, e in all_evals.items():
        if key not in e:
            continue
        case = io.read_case(cases_dir / name)
        truth = io.read_truth(cases_dir / name)
        params = {v["name"]: v.get("params", {}) for v in truth.get("views", [])}
        paired = {p["truth_id"] for p in e[key]["pairs"]}
        for i, sc in enumerate(truth["screws"]):
            exposed = all(_exposed_fraction(v, params.get(v.name, {}), sc["entry_mm"], sc["tip_mm"]) >= EXPOSED_FRACTION
                          for v in case.views[:n_views])
            found = sc.get("id", f"T{i + 1}") in paired
            n_exposed += exposed
            n_paired += exposed and found
            n_hidden += not exposed
            n_hidden_paired += (not exposed) and found
    return {"n_truth": n_exposed, "n_pairs": n_paired, "recall": n_paired / n_exposed if n_exposed else 1.0,
            "n_not_exposed": n_hidden, "n_not_exposed_found": n_hidden_paired,
            "definition": f"shaft >= {EXPOSED_FRACTION:.0%} inside the image, the detector field and the "
                          "collimator shutters in each view used"}


def _drop_other_weights(evals: dict, weights_sha, precision=None) -> None:
    """Remove a case's network results unless they were made with the weights ``weights_sha``
    in the arithmetic ``precision`` (results that name no weights count as another model's; those
    that name no precision were made in float32, before it was recorded); the true-label ones stay."""
    made_in = evals.get("network_precision", "float32")
    if weights_sha and (evals.get("network_weights_sha256") != weights_sha
                        or (precision is not None and made_in != precision)):
        for key in [key for key in evals if key.startswith("network/")]:
            del evals[key]


@contextlib.contextmanager
def _screw_design(name):
    """While simulating only: screws of ``name``'s design (the pipeline keeps its own model)."""
    from PedicleScrewPoseLib import screw

    if name == "ours":
        yield
        return
    original = screw.ScrewSpec.__dict__["from_size"]

    def low_profile(cls, diameter_mm, length_mm, name=None):
        d, L = float(diameter_mm), float(length_mm)
        head_d = float(np.clip(d + 3.0, 9.0, 11.0))
        return cls(diameter_mm=d, length_mm=L, core_diameter_mm=round(0.6 * d, 3), pitch_mm=3.0,
                   tip_length_mm=round(float(np.clip(d, 4.0, 8.0)), 3), head_diameter_mm=head_d,
                   head_height_mm=round(0.4 * head_d + 5.0, 3), name=name if name is not None else f"LP{d:g}x{L:g}")

    def tall_blunt(cls, diameter_mm, length_mm, name=None):
        d, L = float(diameter_mm), float(length_mm)
        head_d = float(np.clip(d + 6.0, 12.0, 14.5))
        return cls(diameter_mm=d, length_mm=L, core_diameter_mm=round(0.8 * d, 3), pitch_mm=2.5,
                   tip_length_mm=round(float(np.clip(0.35 * d, 1.8, 3.0)), 3), head_diameter_mm=head_d,
                   head_height_mm=round(0.55 * head_d + 9.0, 3), name=name if name is not None else f"TB{d:g}x{L:g}")

    screw.ScrewSpec.from_size = classmethod({"low-profile": low_profile, "tall-blunt": tall_blunt}[name])
    try:
        yield
    finally:
        screw.ScrewSpec.from_size = original


def _timing(cases_dir, names, device, weights=None):
    """Median over 3 runs of pipeline.run_case (network included) on the first 8-screw case."""
    from PedicleScrewPoseLib import io, pipeline, segmentation

    pick = None
    for n in names:
        if len(io.read_truth(cases_dir / n)["screws"]) == 8:
            pick = n
            break
    pick = pick or names[0]
    case = io.read_case(cases_dir / pick)
    case = dataclasses.replace(case, views=case.views[:2], images=case.images[:2])
    model = segmentation.load_model(weights, device=device)
    pipeline.run_case(case, model=model, device=device, assess=False)  # warm-up
    runs = []
    for _ in range(3):
        res = pipeline.run_case(case, model=model, device=device, assess=False)
        runs.append(res["timing_s"])
    keys = sorted({k for r in runs for k in r})
    return {"case": pick, "n_screws_truth": len(io.read_truth(cases_dir / pick)["screws"]),
            "views": [v.name for v in case.views], "size": [case.views[0].width, case.views[0].height],
            "device": device, "median_s": {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in keys},
            "runs": runs, "threads": __import__("torch").get_num_threads(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


if __name__ == "__main__":
    sys.exit(main())
