"""Benchmark of the clinical read-out (assessment.py) on simulated misplacements with known truth.

On the example CT: planning.plan_screws places bilateral screws on several
levels; planning.misplace shifts copies medially / laterally / cranially /
caudally until their outer surface breaches by a random distance (0.3-9 mm);
advancing copies along their axis makes anterior breaches (truth from
planning.breach_distance_mm). Truth breach = planning's (label-based, the
CASE_FORMAT definition); truth grade = the same Gertzbein-Robbins grading.

Measured, for the TRUE poses (assessment error alone) and for ESTIMATED poses
(true poses perturbed by the pose bench's errors: bench/results/pose.json when
it has entry / angle errors, else 0.7 mm and 0.7 degrees median, said in the
output): grade agreement, breach distance error (median / mean / p95 / max),
level and side accuracy, and whether the truth grade falls in the reported
grade range. Then the same on the spine rotated (an oblique rotation applied
to the label volume's ijk_to_ras and to the screws). Bone from the label
("label", the truth's definition) and from the CT ("ct").

End to end: the screws that the pipeline itself fitted on bench_pose.py's cases (its evaluation
cache keeps them), graded as ``run`` grades them, against their truth.json breach
(``end_to_end``, per pose set).

    .venv/bin/python bench/bench_assessment.py [--levels T8 ... L3] [--per-screw 3] [--seed 0]
                                               [--pose-cache bench/.cache/pose ...]

Writes bench/results/assessment.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from PedicleScrewPoseLib import assessment, ct as ctm, geometry, io, planning
from PedicleScrewPoseLib.screw import Screw

ROOT = Path(__file__).resolve().parents[1]

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x

# L3 is left out: the example CT cuts it (its label starts at the first slice), so truth.json's
# label-based breach there counts the scan's edge as the vertebra's surface.
DEFAULT_LEVELS = ("T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12", "L1", "L2")
#: Misplacements that needed a larger shift are dropped: the screw then lies in the neighbouring
#: vertebra or across the canal in the other pedicle, not where truth.json's level / side say.
MAX_SHIFT_MM = 12.0
# Largest simulated breach per direction (mm). Cranial / caudal shifts beyond ~6.5 mm put the
# screw mostly into the next vertebra, whose level it then is by the issue's definition ("the
# vertebra holding most of the shaft"), not the intended one that truth.json names.
MAX_BREACH_MM = {"medial": 9.0, "lateral": 9.0, "cranial": 6.5, "caudal": 6.5}
DEFAULT_POSE_ERROR = {"entry_mm_median": 0.7, "angle_deg_median": 0.7}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS))
    ap.add_argument("--per-screw", type=int, default=3, help="misplacements per direction per planned screw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "assessment.json"))
    ap.add_argument("--pose-cache", nargs="+", default=[str(ROOT / "bench" / ".cache" / name) for name in
                                                         ("pose", "pose-voxel", "pose-voxel-prone")],
                    help="bench_pose.py's caches (cases/ and evals/) whose fitted screws are graded end to end "
                         "(default: our 30 cases, the second renderer's and its prone geometry's 10)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()

    ct, labels = ctm.example_ct()
    cases = make_cases(labels, args.levels, args.per_screw, rng)
    truth = np.array([c.breach_mm for c in cases])
    print(f"{len(cases)} screws; truth grades: {grade_counts(truth)}")

    pose_error, pose_source = pose_errors()
    est_cases = [perturb(c, pose_error, rng) for c in cases]

    results = {"screws": len(cases), "levels": list(args.levels), "truth_grades": grade_counts(truth),
               "truth_definition": "planning.breach_distance_mm: outer thread envelope outside the vertebra "
                                   f"label, first {planning.ENTRY_SKIP_MM} mm below the entry not counted",
               "grade_a_tolerance_mm": assessment.CONTAINED_TOLERANCE_MM,
               "misplacements_dropped": dict(DROPPED), "max_shift_mm": MAX_SHIFT_MM,
               "pose_error": {**pose_error, "source": pose_source}, "modes": {}}
    timings = {}
    for bone in ("label", "ct"):
        t0 = time.time()
        anatomy = assessment.Anatomy(labels, ct if bone == "ct" else None, bone=bone)
        if bone == "label":
            label_anatomy = anatomy  # graded again end to end below: its vertebrae are built once
        true_out = assess(cases, anatomy, pose_sigma=0.0, desc=f"{bone} true")
        t1 = time.time()
        # The pose error's scale is the uncertainty carried into the grade.
        est_out = assess(est_cases, anatomy, pose_sigma=pose_error["entry_mm_median"], desc=f"{bone} estimated")
        timings[bone] = {"prepare_and_true_s": round(t1 - t0, 1), "estimated_s": round(time.time() - t1, 1)}
        results["modes"][bone] = {"true_poses": metrics(cases, true_out), "estimated_poses": metrics(cases, est_out)}
        print_mode(bone, results["modes"][bone])
        if bone == "label":
            # How the grade agreement depends on the pose error (same screws, same noise seed).
            sens = []
            for entry_mm in (0.1, 0.25, 0.5, 0.7, 1.0, 1.5):
                err = {"entry_mm_median": entry_mm, "angle_deg_median": entry_mm}
                srng = np.random.default_rng(args.seed + 1)
                out = assess([perturb(c, err, srng) for c in cases], anatomy, pose_sigma=entry_mm,
                             desc=f"pose error {entry_mm}")
                m = metrics(cases, out)
                sens.append({"entry_mm_median": entry_mm, "angle_deg_median": entry_mm,
                             "grade_agreement": m["grade_agreement"], "breach_error_mm": m["breach_error_mm"],
                             "truth_grade_in_reported_range": m["truth_grade_in_reported_range"]})
                print(f"[label, pose error {entry_mm} mm / {entry_mm} deg] grade agreement "
                      f"{m['grade_agreement']:.3f}, breach error median {m['breach_error_mm']['median']:.2f} mm")
            results["pose_error_sensitivity"] = sens

    # Rotated spine: an oblique rotation of the whole scene (labels and screws), label bone.
    Q = np.eye(4)
    Q[:3, :3] = geometry.rotation_matrix([1.0, 2.0, 3.0], 130.0)
    Q[:3, 3] = [15.0, -30.0, 40.0]
    rot_labels = ctm.LabelVolume(labels.array, Q @ labels.ijk_to_ras, names=labels.names)
    rot_cases = [transform_screw(c, Q) for c in cases]
    t0 = time.time()
    rot_out = assess(rot_cases, assessment.Anatomy(rot_labels, None, bone="label"), pose_sigma=0.0, desc="rotated")
    timings["rotated"] = round(time.time() - t0, 1)
    results["rotated_spine"] = {"rotation_axis": [1, 2, 3], "rotation_deg": 130.0, **metrics(cases, rot_out)}
    print_mode("rotated (label, true poses)", {"true_poses": results["rotated_spine"]})

    # End to end: the pipeline's own fitted screws on the pose benchmark's cases (bench_pose.py).
    t0 = time.time()
    results["end_to_end"] = {Path(c).name: end_to_end(Path(c), label_anatomy, args.levels) for c in args.pose_cache}
    timings["end_to_end"] = round(time.time() - t0, 1)

    # The headline numbers the issue asks for: same definition as truth (label), estimated poses.
    head = results["modes"]["label"]
    results["targets"] = {
        "grade_agreement_estimated": head["estimated_poses"]["grade_agreement"],
        "grade_agreement_target": 0.90,
        "breach_error_median_estimated_mm": head["estimated_poses"]["breach_error_mm"]["median"],
        "breach_error_target_mm": 1.0,
        "level_accuracy": min(head["true_poses"]["level_accuracy"], head["estimated_poses"]["level_accuracy"],
                              results["rotated_spine"]["level_accuracy"]),
        "level_target": 0.98,
        "side_accuracy": min(head["true_poses"]["side_accuracy"], head["estimated_poses"]["side_accuracy"],
                             results["rotated_spine"]["side_accuracy"]),
        "side_target": 1.0,
    }
    t = results["targets"]
    t["met"] = bool(t["grade_agreement_estimated"] >= 0.90 and t["breach_error_median_estimated_mm"] <= 1.0
                    and t["level_accuracy"] >= 0.98 and t["side_accuracy"] >= 1.0)
    results["timing_s"] = {**timings, "total": round(time.time() - t_start, 1)}
    results["command"] = "python bench/bench_assessment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    io.write_json_atomic(args.out, results)
    print(json.dumps(results["targets"], indent=1))
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- cases
DROPPED = {"unreachable": 0, "shift_over_max": 0, "mostly_in_another_vertebra": 0}


def held_by_own_level(screw: Screw, labels) -> bool:
    """True when the screw's intended vertebra holds more of its shaft than any other label does.

    A misplaced screw pushed into the neighbouring vertebra is, by the issue's definition of the
    level (the vertebra holding most of the shaft), that vertebra's screw, while truth.json keeps
    the intended level; such cases test the simulator, not the read-out.
    """
    pts = assessment._shaft_samples(screw.entry_mm, screw.axis, screw.spec.length_mm, screw.spec.outer_radius_mm)
    ijk = np.rint(labels.ras_to_ijk_points(pts)).astype(int)
    shape = np.array(labels.array.shape[::-1])
    ok = np.all((ijk >= 0) & (ijk < shape), axis=1)
    vals = np.asarray(labels.array)[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]].astype(int)
    names = assessment.vertebra_names(labels)
    vals = vals[np.isin(vals, list(names))]
    own = labels.value_of(screw.level)
    if len(vals) == 0:
        return True
    counts = np.bincount(vals)
    return counts[own] >= counts.max() if own < len(counts) else False


def make_cases(labels, levels, per_screw, rng) -> list[Screw]:
    """Planned screws plus misplaced copies (4 directions x per_screw random distances, and anterior)."""
    planned = planning.plan_screws(labels, levels=tuple(levels))
    cases = []
    dropped = DROPPED
    for s in tqdm(planned, desc="misplacing"):
        s.extra["direction"] = None
        cases.append(s)
        for direction in planning.DIRECTIONS:
            for _ in range(per_screw):
                dist = float(rng.uniform(0.3, MAX_BREACH_MM[direction]))
                try:
                    m = planning.misplace(s, direction, dist, labels)
                except ValueError:
                    dropped["unreachable"] += 1
                    continue
                if m.extra["misplacement"]["shift_mm"] > MAX_SHIFT_MM:
                    dropped["shift_over_max"] += 1
                    continue
                if not held_by_own_level(m, labels):
                    dropped["mostly_in_another_vertebra"] += 1
                    continue
                m.extra["direction"] = direction
                cases.append(m)
        # Anterior: advance the screw along its axis (too deep through the anterior cortex).
        for _ in range(per_screw):
            adv = float(rng.uniform(1.0, 12.0))
            T = s.T_world_from_screw.copy()
            T[:3, 3] += adv * s.axis
            m = Screw(s.spec, T, id=s.id, level=s.level, side=s.side, extra=dict(s.extra))
            m.breach_mm = planning.breach_distance_mm(m, labels)
            m.extra["direction"] = "anterior"
            cases.append(m)
    return cases


def pose_errors() -> tuple[dict, str]:
    """Median entry error (mm) and angle error (deg) of the pose pipeline, from bench/results/pose.json."""
    p = ROOT / "bench" / "results" / "pose.json"
    if p.exists():
        try:
            doc = json.loads(p.read_text())
            # The whole pipeline (network segmentation, two views) when measured, else what there is.
            results = doc.get("results") or {}
            for key in ("network/2views", "network/3views", "truth/2views", *results):
                if key in results:
                    entry = _find_median(results[key], "entry")
                    angle = _find_median(results[key], "angle")
                    if entry is not None and angle is not None:
                        return ({"entry_mm_median": float(entry), "angle_deg_median": float(angle)},
                                f"{p.relative_to(ROOT)} results[{key!r}]")
        except (OSError, ValueError, AttributeError):
            pass
    return dict(DEFAULT_POSE_ERROR), "assumed (no usable bench/results/pose.json): 0.7 mm entry, 0.7 deg median"


def _find_median(doc, key):
    """First ``median`` under a dict whose key mentions ``key`` (pose.json layout is the pose helper's)."""
    stack = [doc]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            for k, v in d.items():
                if key in str(k).lower() and isinstance(v, dict) and isinstance(v.get("median"), (int, float)):
                    return v["median"]
                stack.append(v)
        elif isinstance(d, list):
            stack.extend(d)
    return None


def perturb(screw: Screw, err: dict, rng) -> Screw:
    """The screw moved by a random pose error: translation with the given median norm (isotropic 3D
    Gaussian) and a rotation about a random axis perpendicular to the screw, through the screw's
    middle, with the given median angle."""
    sigma_t = err["entry_mm_median"] / 1.5382  # median of |N(0, s^2 I3)| = 1.5382 s
    sigma_a = math.radians(err["angle_deg_median"]) / 1.1774  # median of |N(0, s^2 I2)| = 1.1774 s
    t = rng.normal(0.0, sigma_t, 3)
    a2 = rng.normal(0.0, sigma_a, 2)
    angle = float(np.linalg.norm(a2))
    u = np.cross(screw.axis, [1.0, 0.0, 0.0] if abs(screw.axis[0]) < 0.9 else [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(screw.axis, u)
    rot_axis = a2[0] * u + a2[1] * v
    R = geometry.rotation_matrix(rot_axis, math.degrees(angle)) if angle > 0 else np.eye(3)
    mid = screw.entry_mm + 0.5 * screw.spec.length_mm * screw.axis
    T = screw.T_world_from_screw.copy()
    T[:3, :3] = R @ T[:3, :3]
    T[:3, 3] = R @ (screw.entry_mm - mid) + mid + t
    return Screw(screw.spec, T, id=screw.id, level=screw.level, side=screw.side, breach_mm=screw.breach_mm,
                 extra=dict(screw.extra))


def transform_screw(screw: Screw, Q) -> Screw:
    return Screw(screw.spec, Q @ screw.T_world_from_screw, id=screw.id, level=screw.level, side=screw.side,
                 breach_mm=screw.breach_mm, extra=dict(screw.extra))


def as_result(screw: Screw) -> dict:
    return {"id": screw.id, "entry_mm": screw.entry_mm.tolist(), "tip_mm": screw.tip_mm.tolist(),
            "diameter_mm": screw.spec.diameter_mm, "length_mm": screw.spec.length_mm,
            "transform": screw.T_world_from_screw.tolist(), "confidence": 1.0}


def assess(cases, anatomy, pose_sigma, desc):
    return [assessment.assess_screw(as_result(c), anatomy, pose_sigma=pose_sigma, where=c.id)
            for c in tqdm(cases, desc=desc)]


# ----------------------------------------------------------------------------- end to end
END_TO_END_KEYS = ("network/2views", "network/3views", "truth/2views", "truth/3views")


def end_to_end(cache: Path, anatomy, levels) -> dict:
    """Grades of the pipeline's own fitted screws against truth.json's breach, on the cases of
    bench_pose.py (``cache``: its ``cases/`` and ``evals/``; the evaluations must hold the fitted
    screws, which bench_pose.py keeps since session 28).  ``anatomy``: the example CT's
    ``assessment.Anatomy`` with label bone (truth.json's definition).

    Per mode (network or true label maps, two or three views): the paired screws are graded as
    ``run`` grades them (label bone; the pose uncertainty from each screw's confidence), and
    compared with the grade of their true breach; screws the pipeline missed are counted apart.
    Only screws at ``levels`` count (L3 is cut by the example CT, see DEFAULT_LEVELS). The
    breaches of these cases are mostly grade A and never E: this is a check of the whole chain,
    beside the A-E set above, not a replacement for it.
    """
    evals_dir, cases_dir = cache / "evals", cache / "cases"
    if not evals_dir.is_dir():
        return {"skipped": f"no pose benchmark cache at {cache} (run bench/bench_pose.py first)"}
    per_mode = {key: {"truth": [], "outs": [], "missed": 0, "cases": 0} for key in ("true_poses",) + END_TO_END_KEYS}
    for f in tqdm(sorted(evals_dir.glob("*.json")), desc="end to end"):
        doc = json.loads(f.read_text())
        truth_path = cases_dir / f.stem / "truth" / "truth.json"
        if not truth_path.exists():
            continue
        truth = io.read_truth(truth_path)
        graded = [(ti, t) for ti, t in enumerate(truth["screws"])
                  if t.get("level") in levels and t.get("breach_mm") is not None]
        if graded and any("screws" in (doc.get(key) or {}) for key in END_TO_END_KEYS):
            # The true poses of the same screws: the read-out's own error on these cases.
            acc = per_mode["true_poses"]
            acc["cases"] += 1
            for _ti, t in graded:
                screw = Screw.from_truth_dict(t)
                acc["outs"].append(assessment.assess_screw(as_result(screw), anatomy, pose_sigma=0.0,
                                                           where=f"{f.stem} truth {screw.id}"))
                acc["truth"].append(screw)
        for key in END_TO_END_KEYS:
            ev = doc.get(key)
            if not ev or "screws" not in ev:
                continue
            acc = per_mode[key]
            acc["cases"] += 1
            paired = {p["truth_index"]: p["result_index"] for p in ev["pairs"]}
            for ti, t in graded:
                if ti not in paired:
                    acc["missed"] += 1
                    continue
                screw = ev["screws"][paired[ti]]
                acc["outs"].append(assessment.assess_screw(screw, anatomy, where=f"{f.stem} {key} {screw['id']}"))
                acc["truth"].append(Screw.from_truth_dict(t))
    shown = cache.resolve().relative_to(ROOT) if cache.resolve().is_relative_to(ROOT) else cache
    out = {"cases": str(shown), "levels": list(levels), "bone": "label",
           "pose_sigma": "from each screw's confidence (assessment.sigma_from_confidence)"}
    for key, acc in per_mode.items():
        if not acc["outs"]:
            continue
        truth_b = [c.breach_mm for c in acc["truth"]]
        out[key] = {"cases": acc["cases"], "graded": len(acc["outs"]), "missed_by_the_pipeline": acc["missed"],
                    "truth_grades": grade_counts(truth_b), **metrics(acc["truth"], acc["outs"])}
    if not any(key in out for key in END_TO_END_KEYS):
        out["skipped"] = (f"no evaluation in {evals_dir} holds the fitted screws (rerun bench/bench_pose.py "
                          "after deleting its evals)")
    return out


# ----------------------------------------------------------------------------- metrics
def grade_counts(breaches) -> dict:
    g = [assessment.grade_from_breach_mm(b) for b in breaches]
    return {k: g.count(k) for k in assessment.GRADES}


def stats(x) -> dict:
    x = np.asarray(x, float)
    return {"median": round(float(np.median(x)), 3), "mean": round(float(np.mean(x)), 3),
            "p95": round(float(np.percentile(x, 95)), 3), "max": round(float(np.max(x)), 3), "n": int(len(x))}


def metrics(cases, outs) -> dict:
    truth_b = np.array([c.breach_mm for c in cases])
    est_b = np.array([o["breach"]["max_mm"] if o["breach"]["max_mm"] is not None else np.nan for o in outs])
    tg = [assessment.grade_from_breach_mm(b) for b in truth_b]
    eg = [o["breach"]["grade"] for o in outs]
    order = {g: i for i, g in enumerate(assessment.GRADES)}
    in_range = [o["breach"]["grade_range"][0] is not None
                and order[o["breach"]["grade_range"][0]] <= order[t] <= order[o["breach"]["grade_range"][1]]
                for o, t in zip(outs, tg)]
    confusion = {t: {e: 0 for e in assessment.GRADES} for t in assessment.GRADES}
    for t, e in zip(tg, eg):
        if e is not None:
            confusion[t][e] += 1
    directed = [(c.extra.get("direction"), o["breach"]["direction"], o["breach"]["medial_flag"], b)
                for c, o, b in zip(cases, outs, truth_b)]
    big = [(d, got) for d, got, _, b in directed if d is not None and b >= 2.0]
    medial = [flag for d, _, flag, b in directed if d == "medial" and b >= 1.0]
    nonmedial_flags = [flag for d, _, flag, b in directed if d in ("lateral", "cranial", "caudal", "anterior")]
    return {
        "grade_agreement": round(float(np.mean([t == e for t, e in zip(tg, eg)])), 4),
        "grade_within_one": round(float(np.mean([e is not None and abs(order[t] - order[e]) <= 1
                                                 for t, e in zip(tg, eg)])), 4),
        "truth_grade_in_reported_range": round(float(np.mean(in_range)), 4),
        "grade_uncertain_fraction": round(float(np.mean([o["breach"]["grade_uncertain"] for o in outs])), 4),
        "breach_error_mm": stats(np.abs(est_b - truth_b)),
        "breach_bias_mm": round(float(np.nanmean(est_b - truth_b)), 3),
        "level_accuracy": round(float(np.mean([o["level"] == c.level for c, o in zip(cases, outs)])), 4),
        "side_accuracy": round(float(np.mean([o["side"] == c.side for c, o in zip(cases, outs)])), 4),
        "direction_accuracy_truth_ge_2mm": round(float(np.mean([d == got for d, got in big])), 4) if big else None,
        "medial_flag_recall_truth_ge_1mm": round(float(np.mean(medial)), 4) if medial else None,
        "medial_flag_on_other_directions": round(float(np.mean(nonmedial_flags)), 4) if nonmedial_flags else None,
        "confusion_truth_by_estimate": confusion,
    }


def print_mode(name, m):
    for k, v in m.items():
        print(f"[{name}] {k}: grade agreement {v['grade_agreement']:.3f}, within one {v['grade_within_one']:.3f}, "
              f"breach error median {v['breach_error_mm']['median']:.2f} mean {v['breach_error_mm']['mean']:.2f} "
              f"p95 {v['breach_error_mm']['p95']:.2f} mm, level {v['level_accuracy']:.3f}, side {v['side_accuracy']:.3f}, "
              f"direction {v['direction_accuracy_truth_ge_2mm']}, medial flag recall {v['medial_flag_recall_truth_ge_1mm']}")


if __name__ == "__main__":
    sys.exit(main())
