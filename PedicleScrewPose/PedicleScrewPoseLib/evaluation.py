"""Scoring result.json against truth.json (the metrics of CASE_FORMAT.md).

Predicted and true screws are paired by the Hungarian method on the segment error
(max of entry and tip error, mm); a pair over 10 mm is no pair.  Per pair: angle error
(degrees between the entry-to-tip directions), entry, tip and segment errors (mm).
Detection: recall = pairs / true screws, precision = pairs / predicted screws.
Summaries give median, mean, 95th percentile and max, never a mean alone.
Segmentation: Dice per class (head, shaft) of each view's label map written by ``run``
against the simulator's, per image, then averaged (with median and 5th percentile).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["evaluate", "summarize", "format_table", "format_summary", "MAX_PAIR_MM", "dice_per_class",
           "segmentation_dice", "summarize_dice", "add_evaluate_arguments", "evaluate_command"]

MAX_PAIR_MM = 10.0
METRICS = ("angle_deg", "entry_mm", "tip_mm", "segment_mm")


def _points(screw, where):
    try:
        e = np.asarray(screw["entry_mm"], float).reshape(3)
        t = np.asarray(screw["tip_mm"], float).reshape(3)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: needs 'entry_mm' and 'tip_mm' as three numbers each") from None
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(t))) or np.linalg.norm(t - e) == 0:
        raise ValueError(f"{where}: entry_mm and tip_mm must be finite and differ")
    return e, t


def evaluate(result: dict, truth: dict, max_pair_mm: float = MAX_PAIR_MM) -> dict:
    """Pairs and metrics of one case.  ``result``/``truth``: dicts with a ``screws`` list."""
    pred = [_points(s, f"result screws[{i}]") for i, s in enumerate(result.get("screws", []))]
    true = [_points(s, f"truth screws[{i}]") for i, s in enumerate(truth.get("screws", []))]
    pairs = []
    if pred and true:
        E = np.array([[np.linalg.norm(p[0] - t[0]) for t in true] for p in pred])
        T = np.array([[np.linalg.norm(p[1] - t[1]) for t in true] for p in pred])
        S = np.maximum(E, T)
        # Pairs over the limit cost the same large amount, so far-off predictions cannot
        # steer the assignment: the most valid pairs first, then the smallest errors.
        rows, cols = linear_sum_assignment(np.where(S > max_pair_mm, 1e6, S))
        for r, c in zip(rows, cols):
            if S[r, c] > max_pair_mm:
                continue
            dp = pred[r][1] - pred[r][0]
            dt = true[c][1] - true[c][0]
            cosang = float(dp @ dt / (np.linalg.norm(dp) * np.linalg.norm(dt)))
            pairs.append({
                "result_index": int(r),
                "truth_index": int(c),
                "result_id": result["screws"][r].get("id", f"S{r + 1}"),
                "truth_id": truth["screws"][c].get("id", f"T{c + 1}"),
                "angle_deg": float(np.degrees(np.arccos(np.clip(cosang, -1.0, 1.0)))),
                "entry_mm": float(E[r, c]),
                "tip_mm": float(T[r, c]),
                "segment_mm": float(S[r, c]),
            })
    n_pred, n_true = len(pred), len(true)
    paired_r = {p["result_index"] for p in pairs}
    paired_t = {p["truth_index"] for p in pairs}
    return {
        "n_result": n_pred,
        "n_truth": n_true,
        "n_pairs": len(pairs),
        # No true screws: nothing to miss (recall 1); no predictions: nothing wrong (precision 1).
        "recall": len(pairs) / n_true if n_true else 1.0,
        "precision": len(pairs) / n_pred if n_pred else 1.0,
        "pairs": pairs,
        "missed": [truth["screws"][i].get("id", f"T{i + 1}") for i in range(n_true) if i not in paired_t],
        "false_positives": [result["screws"][i].get("id", f"S{i + 1}") for i in range(n_pred) if i not in paired_r],
        "summary": _stats_of(pairs),
    }


def _stats(values) -> dict:
    v = np.asarray(values, float)
    if v.size == 0:
        return {"n": 0, "median": None, "mean": None, "p95": None, "max": None}
    return {"n": int(v.size), "median": float(np.median(v)), "mean": float(v.mean()),
            "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def _stats_of(pairs) -> dict:
    return {m: _stats([p[m] for p in pairs]) for m in METRICS}


def summarize(evaluations) -> dict:
    """Pooled metrics over many cases: every pair counts once; detection over all screws."""
    evaluations = list(evaluations)
    pairs = [p for e in evaluations for p in e["pairs"]]
    n_true = sum(e["n_truth"] for e in evaluations)
    n_pred = sum(e["n_result"] for e in evaluations)
    n_pairs = len(pairs)
    return {
        "n_cases": len(evaluations),
        "n_truth": n_true,
        "n_result": n_pred,
        "n_pairs": n_pairs,
        "recall": n_pairs / n_true if n_true else 1.0,
        "precision": n_pairs / n_pred if n_pred else 1.0,
        **_stats_of(pairs),
    }


def dice_per_class(pred_labels: np.ndarray, true_labels: np.ndarray) -> dict:
    """Dice of head (1) and shaft (2) for one image; NaN where the class is absent in both."""
    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label maps of shapes {pred_labels.shape} and {true_labels.shape} cannot be compared")
    out = {}
    for c, name in ((1, "head"), (2, "shaft")):
        p, t = pred_labels == c, true_labels == c
        s = p.sum() + t.sum()
        out[name] = float(2 * (p & t).sum() / s) if s else float("nan")
    return out


def segmentation_dice(result_dir, case_dir) -> dict | None:
    """Dice per class of each view's label map that ``run`` wrote (``<view>_labels.png`` in
    ``result_dir``) against the truth's (``case_dir/truth/<view>_labels.png``), for the views
    of ``case_dir/case.json``.  None when a view lacks either map (a case without simulated
    truth, or a result folder without label maps).  ``{"views": {name: {"head", "shaft"}}}``;
    NaN where a class is in neither map."""
    from . import io  # noqa: PLC0415

    case_dir, result_dir = Path(case_dir), Path(result_dir)
    manifest = case_dir / "case.json"
    if not manifest.is_file():
        return None
    views = io.read_json(manifest).get("views")
    if not isinstance(views, list) or not views:
        return None
    out = {}
    for v in views:
        name = v.get("name") if isinstance(v, dict) else None
        if not isinstance(name, str):
            return None
        base = io.safe_view_filename(name)
        pred_path, true_path = result_dir / f"{base}_labels.png", case_dir / "truth" / f"{base}_labels.png"
        if not (pred_path.is_file() and true_path.is_file()):
            return None
        pred, true = io.read_image(pred_path), io.read_image(true_path)
        if pred.shape != true.shape:
            raise ValueError(f"{pred_path}: shape {pred.shape} differs from the truth's {true_path} {true.shape}")
        out[name] = dice_per_class(pred.astype(np.uint8), true.astype(np.uint8))
    return {"views": out}


def summarize_dice(per_case) -> dict:
    """Per class, over every view of every case (None entries skipped): median, mean and 5th
    percentile of the per-image Dice, images where the class is in neither map left out."""
    values = {"head": [], "shaft": []}
    for d in per_case:
        for dv in (d or {}).get("views", {}).values():
            for k in values:
                if dv.get(k) is not None and np.isfinite(dv[k]):
                    values[k].append(dv[k])
    out = {}
    for k, v in values.items():
        a = np.asarray(v, float)
        out[k] = ({"n": int(a.size), "median": float(np.median(a)), "mean": float(a.mean()),
                   "p5": float(np.percentile(a, 5))} if a.size else {"n": 0, "median": None, "mean": None, "p5": None})
    return out


def _format_dice(d: dict) -> str:
    return "segmentation Dice (per image; median / mean / p5): " + "  ".join(
        f"{k} {_fmt(s['median'], 3)} / {_fmt(s['mean'], 3)} / {_fmt(s['p5'], 3)} (n {s['n']})" for k, s in d.items())


def _case_dir_of_truth(path) -> Path:
    """The case folder of a truth argument (truth.json, its truth/ folder or the case folder)."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if p.name == "truth" and not (p / "case.json").exists():
        p = p.parent
    return p


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def format_summary(summary: dict, title: str = "") -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"cases {summary.get('n_cases', 1)}  true {summary['n_truth']}  found {summary['n_result']}  "
                 f"paired {summary['n_pairs']}  recall {summary['recall']:.3f}  precision {summary['precision']:.3f}")
    lines.append(f"{'metric':<12}{'median':>9}{'mean':>9}{'p95':>9}{'max':>9}")
    stats = summary if "angle_deg" in summary else summary.get("summary", {})
    for m in METRICS:
        s = stats[m]
        lines.append(f"{m:<12}{_fmt(s['median']):>9}{_fmt(s['mean']):>9}{_fmt(s['p95']):>9}{_fmt(s['max']):>9}")
    return "\n".join(lines)


def format_table(ev: dict, result: dict | None = None, truth: dict | None = None) -> str:
    """Per-screw table of one case's evaluation, then its summary."""
    lines = [f"{'result':<8}{'truth':<10}{'angle°':>8}{'entry mm':>10}{'tip mm':>8}{'seg mm':>8}{'conf':>6}"]
    for p in sorted(ev["pairs"], key=lambda p: str(p["truth_id"])):
        conf = ""
        if result is not None:
            c = result["screws"][p["result_index"]].get("confidence")
            conf = "" if c is None else f"{c:.2f}"
        lines.append(f"{p['result_id']:<8}{str(p['truth_id']):<10}{p['angle_deg']:>8.2f}{p['entry_mm']:>10.2f}"
                     f"{p['tip_mm']:>8.2f}{p['segment_mm']:>8.2f}{conf:>6}")
    for t in ev["missed"]:
        lines.append(f"{'-':<8}{str(t):<10}  missed")
    for r in ev["false_positives"]:
        lines.append(f"{str(r):<8}{'-':<10}  no true screw within {MAX_PAIR_MM:g} mm")
    summary = dict(ev["summary"])
    summary.update({k: ev[k] for k in ("n_truth", "n_result", "n_pairs", "recall", "precision")})
    summary["n_cases"] = 1
    lines.append("")
    lines.append(format_summary(summary))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- CLI


def add_evaluate_arguments(parser) -> None:
    parser.add_argument("result", nargs="?", help="result.json (or the run's output folder)")
    parser.add_argument("truth", nargs="?", help="truth.json (or the case folder)")
    parser.add_argument("--results-dir", help="folder of run outputs, one sub-folder per case (with result.json)")
    parser.add_argument("--cases-dir", help="folder of case folders (with truth/truth.json), same names")
    parser.add_argument("--results-glob", help="glob of result.json files; the case is the parent folder's name")
    parser.add_argument("--json", dest="json_path", help="write the evaluation(s) and summary here")
    parser.add_argument("--max-pair-mm", type=float, default=MAX_PAIR_MM, help="largest segment error of a pair")


def evaluate_command(args) -> int:
    from . import io  # noqa: PLC0415

    doc: dict
    if args.result or args.truth:
        if not (args.result and args.truth):
            raise ValueError("evaluate: give both RESULT and TRUTH (or --results-dir with --cases-dir)")
        result = io.read_result(args.result)
        truth = io.read_truth(args.truth)
        ev = evaluate(result, truth, max_pair_mm=args.max_pair_mm)
        rp = Path(args.result)
        dice = segmentation_dice(rp if rp.is_dir() else rp.parent, _case_dir_of_truth(args.truth))
        print(format_table(ev, result=result, truth=truth))
        doc = {"evaluation": ev}
        if dice is not None:
            ev["segmentation"] = dice
            doc["segmentation"] = summarize_dice([dice])
            print(_format_dice(doc["segmentation"]))
    else:
        if not args.cases_dir or not (args.results_dir or args.results_glob):
            raise ValueError("evaluate: give RESULT TRUTH, or --cases-dir with --results-dir or --results-glob")
        cases_dir = Path(args.cases_dir)
        if not cases_dir.is_dir():
            raise FileNotFoundError(f"--cases-dir {cases_dir} is not a folder")
        if args.results_glob:
            files = sorted(Path(p) for p in glob.glob(args.results_glob))
        else:
            rd = Path(args.results_dir)
            if not rd.is_dir():
                raise FileNotFoundError(f"--results-dir {rd} is not a folder")
            files = sorted(rd.glob("*/result.json"))
        if not files:
            raise ValueError("evaluate: no result.json files found")
        per_case = {}
        for f in files:
            name = f.parent.name
            case = cases_dir / name
            if not (case / "truth" / "truth.json").exists() and not (case / "truth.json").exists():
                raise FileNotFoundError(f"no truth for {f}: expected {case / 'truth' / 'truth.json'}")
            per_case[name] = evaluate(io.read_result(f), io.read_truth(case), max_pair_mm=args.max_pair_mm)
            dice = segmentation_dice(f.parent, case)
            if dice is not None:
                per_case[name]["segmentation"] = dice
        summary = summarize(per_case.values())
        dices = [e["segmentation"] for e in per_case.values() if "segmentation" in e]
        if dices:
            summary["segmentation"] = summarize_dice(dices)
        print(f"{'case':<24}{'true':>5}{'found':>6}{'recall':>8}{'prec':>7}{'med ang°':>9}{'med seg':>9}{'max seg':>9}")
        for name, ev in per_case.items():
            s = ev["summary"]
            print(f"{name:<24}{ev['n_truth']:>5}{ev['n_result']:>6}{ev['recall']:>8.3f}{ev['precision']:>7.3f}"
                  f"{_fmt(s['angle_deg']['median']):>9}{_fmt(s['segment_mm']['median']):>9}"
                  f"{_fmt(s['segment_mm']['max']):>9}")
        print()
        print(format_summary(summary, title="all cases"))
        if "segmentation" in summary:
            print(_format_dice(summary["segmentation"]) + f" over {len(dices)} of {len(per_case)} cases")
        doc = {"cases": per_case, "summary": summary}
    if args.json_path:
        io.write_json_atomic(args.json_path, doc)
        print(f"-> {args.json_path}")
    return 0
