"""Evaluation metrics on hand-made results with known errors, and the evaluate command."""
import json

import numpy as np
import pytest

from PedicleScrewPoseLib import cli, evaluation, io


def screw(sid, entry, tip):
    return {"id": sid, "entry_mm": list(map(float, entry)), "tip_mm": list(map(float, tip))}


TRUTH = {"format": "pedicle-screw-truth/1", "screws": [
    screw("T12-L", [0, 0, 0], [0, 40, 0]),
    screw("T12-R", [30, 0, 0], [30, 40, 0]),
    screw("L1-L", [0, 0, -30], [0, 40, -30]),
]}


def test_known_errors_and_pairing():
    # T12-R: entry 1 mm off, tip on (angle atan(1/40)); L1-L: shifted 2 mm; T12-L missed;
    # one prediction 50 mm away (no pair); listed in a shuffled order.
    result = {"screws": [
        screw("S1", [0, 0, -28], [0, 40, -28]),
        screw("S2", [100, 0, 0], [100, 40, 0]),
        screw("S3", [31, 0, 0], [30, 40, 0]),
    ]}
    ev = evaluation.evaluate(result, TRUTH)
    assert ev["n_pairs"] == 2
    assert ev["recall"] == pytest.approx(2 / 3)
    assert ev["precision"] == pytest.approx(2 / 3)
    assert ev["missed"] == ["T12-L"]
    assert ev["false_positives"] == ["S2"]
    pairs = {p["truth_id"]: p for p in ev["pairs"]}
    assert pairs["T12-R"]["result_id"] == "S3"
    assert pairs["T12-R"]["entry_mm"] == pytest.approx(1.0)
    assert pairs["T12-R"]["tip_mm"] == pytest.approx(0.0)
    assert pairs["T12-R"]["segment_mm"] == pytest.approx(1.0)
    assert pairs["T12-R"]["angle_deg"] == pytest.approx(np.degrees(np.arctan2(1, 40)))
    assert pairs["L1-L"]["segment_mm"] == pytest.approx(2.0)
    assert pairs["L1-L"]["angle_deg"] == pytest.approx(0.0, abs=1e-6)
    s = ev["summary"]["segment_mm"]
    assert s["median"] == pytest.approx(1.5) and s["max"] == pytest.approx(2.0) and s["mean"] == pytest.approx(1.5)


def test_hungarian_beats_greedy():
    truth = {"screws": [screw("A", [0, 0, 0], [0, 40, 0]), screw("B", [6, 0, 0], [6, 40, 0])]}
    # P1 is nearest to A but a greedy pairing (P1-A) would leave P2 10.5 mm from B: no pair.
    result = {"screws": [screw("P1", [3, 0, 0], [3, 40, 0]), screw("P2", [-4, 0, 0], [-4, 40, 0])]}
    ev = evaluation.evaluate(result, truth)
    assert ev["n_pairs"] == 2
    assert {(p["result_id"], p["truth_id"]) for p in ev["pairs"]} == {("P1", "B"), ("P2", "A")}


def test_over_ten_mm_is_no_pair_and_empty_lists():
    ev = evaluation.evaluate({"screws": [screw("S", [0, 0, 10.5], [0, 40, 10.5])]}, TRUTH)
    assert ev["n_pairs"] == 0 and ev["recall"] == 0.0 and ev["precision"] == 0.0
    ev = evaluation.evaluate({"screws": []}, TRUTH)
    assert ev["recall"] == 0.0 and ev["precision"] == 1.0
    ev = evaluation.evaluate({"screws": []}, {"screws": []})
    assert ev["recall"] == 1.0 and ev["precision"] == 1.0
    assert ev["summary"]["angle_deg"]["median"] is None


def test_summarize_pools_pairs():
    a = evaluation.evaluate({"screws": [screw("S", [1, 0, 0], [0, 40, 0])]}, TRUTH)
    b = evaluation.evaluate({"screws": [screw("S", [30, 0, 3], [30, 40, 3]), screw("X", [0, 0, 90], [0, 40, 90])]},
                            TRUTH)
    s = evaluation.summarize([a, b])
    assert s["n_cases"] == 2 and s["n_truth"] == 6 and s["n_result"] == 3 and s["n_pairs"] == 2
    assert s["recall"] == pytest.approx(2 / 6) and s["precision"] == pytest.approx(2 / 3)
    assert s["segment_mm"]["median"] == pytest.approx(2.0)
    assert s["segment_mm"]["max"] == pytest.approx(3.0)
    assert set(s["segment_mm"]) == {"n", "median", "mean", "p95", "max"}


def test_bad_screw_entry():
    with pytest.raises(ValueError, match=r"result screws\[0\]"):
        evaluation.evaluate({"screws": [{"entry_mm": [0, 0]}]}, TRUTH)


def test_evaluate_command_single_and_many(tmp_path, capsys):
    cases, results = tmp_path / "cases", tmp_path / "results"
    for name, shift in (("c1", 1.0), ("c2", 2.0)):
        (cases / name / "truth").mkdir(parents=True)
        io.write_json_atomic(cases / name / "truth" / "truth.json", TRUTH)
        (results / name).mkdir(parents=True)
        res = {"screws": [screw(f"S{i}", np.add(t["entry_mm"], [shift, 0, 0]), t["tip_mm"])
                          for i, t in enumerate(TRUTH["screws"])]}
        io.write_result(results / name, res)
    out = tmp_path / "ev.json"
    assert cli.main(["evaluate", str(results / "c1" / "result.json"), str(cases / "c1"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["evaluation"]["n_pairs"] == 3
    assert "segment_mm" in capsys.readouterr().out
    out2 = tmp_path / "all.json"
    assert cli.main(["evaluate", "--results-dir", str(results), "--cases-dir", str(cases), "--json", str(out2)]) == 0
    doc = json.loads(out2.read_text(encoding="utf-8"))
    assert doc["summary"]["n_pairs"] == 6
    assert doc["summary"]["entry_mm"]["max"] == pytest.approx(2.0)
    assert set(doc["cases"]) == {"c1", "c2"}
    assert "segmentation" not in doc["summary"]  # no label maps on either side
    # Missing truth: one clear line, exit 1.
    assert cli.main(["evaluate", "--results-dir", str(results), "--cases-dir", str(tmp_path)]) == 1
    assert "no truth" in capsys.readouterr().err


def test_evaluate_scores_the_label_maps_when_both_sides_have_them(tmp_path, capsys):
    case, res = tmp_path / "case", tmp_path / "run"
    truth_map = np.zeros((40, 50), np.uint8)
    truth_map[10:14, 5:30] = 2
    truth_map[9:15, 30:36] = 1
    (case / "truth").mkdir(parents=True)
    io.write_json_atomic(case / "case.json", {"views": [{"name": "AP/1", "image": "ap.png"}]})
    io.write_json_atomic(case / "truth" / "truth.json", TRUTH)
    io.write_png(case / "truth" / f"{io.safe_view_filename('AP/1')}_labels.png", truth_map)
    pred = truth_map.copy()
    pred[10:14, 5:17] = 0  # half the shaft missed: shaft Dice 2 * 13 / (13 + 25) per row
    io.write_result(res, {"screws": [screw("S", t["entry_mm"], t["tip_mm"]) for t in TRUTH["screws"]]})
    io.write_png(res / f"{io.safe_view_filename('AP/1')}_labels.png", pred)
    out = tmp_path / "ev.json"
    assert cli.main(["evaluate", str(res), str(case / "truth" / "truth.json"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    d = doc["evaluation"]["segmentation"]["views"]["AP/1"]
    assert d["head"] == pytest.approx(1.0) and d["shaft"] == pytest.approx(26 / 38)
    assert doc["segmentation"]["shaft"]["mean"] == pytest.approx(26 / 38)
    assert "segmentation Dice" in capsys.readouterr().out
    # A label map of another size than the truth's: one clear line, exit 1.
    io.write_png(res / f"{io.safe_view_filename('AP/1')}_labels.png", pred[:20])
    assert cli.main(["evaluate", str(res), str(case)]) == 1
    assert "differs from the truth" in capsys.readouterr().err
