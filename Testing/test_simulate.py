"""Simulated cases: files per CASE_FORMAT.md, truth that matches P, determinism, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from PedicleScrewPoseLib import ct as ctmod
from PedicleScrewPoseLib import geometry, io, simulate

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def example():
    ct, labels = ctmod.example_ct()
    return ct, labels, {}


def _case(tmp_path, example, name, seed=3, **kw):
    ct, labels, cache = example
    kw.setdefault("view_names", ("ap", "lat", "obl"))
    kw.setdefault("levels", ("T12",))
    kw.setdefault("image_size", 128)
    return simulate.simulate_case(tmp_path / name, ct, labels, seed=seed, cache=cache, **kw)


def test_case_files_and_truth_agree_with_P(tmp_path, example):
    info = _case(tmp_path, example, "c", realistic=True)
    case = io.read_case(tmp_path / "c")
    truth = io.read_truth(tmp_path / "c")
    assert [v.name for v in case.views] == ["AP", "LAT", "OBL"] == info["views"]
    assert len(truth["screws"]) == info["n_screws"] == 2
    assert {s["level"] for s in truth["screws"]} == {"T12"}
    assert sorted((s["diameter_mm"], s["length_mm"]) for s in case.implants) == \
        sorted((s["diameter_mm"], s["length_mm"]) for s in truth["screws"])
    for view, img in zip(case.views, case.images):
        assert img.shape == (128, 128)
        assert view.metal in ("bright", "dark")
        lab = np.asarray(io.read_truth_labels(tmp_path / "c", view.name))
        assert set(np.unique(lab)) <= {0, 1, 2} and (lab > 0).sum() > 20
        for s in truth["screws"]:
            e, t = np.array(s["entry_mm"]), np.array(s["tip_mm"])
            u = (t - e) / np.linalg.norm(t - e)
            mid = e + 0.6 * s["length_mm"] * u
            uv = np.round(geometry.project(view.P, mid)).astype(int)
            if 0 <= uv[0] < 128 and 0 <= uv[1] < 128:
                assert lab[uv[1], uv[0]] in (1, 2), (view.name, s["id"])


def test_same_seed_same_bytes_and_no_overwrite(tmp_path, example):
    _case(tmp_path, example, "a", seed=9, view_names=("ap", "lat"))
    _case(tmp_path, example, "b", seed=9, view_names=("ap", "lat"))
    for rel in ("AP.png", "LAT.png", "case.json", "truth/truth.json", "truth/AP_labels.png", "truth/LAT_labels.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    with pytest.raises(FileExistsError):
        _case(tmp_path, example, "a", seed=9, view_names=("ap", "lat"))
    _case(tmp_path, example, "d", seed=10, view_names=("ap", "lat"))
    assert (tmp_path / "a" / "AP.png").read_bytes() != (tmp_path / "d" / "AP.png").read_bytes()


def test_ideal_case_has_exact_geometry_and_no_noise(tmp_path, example):
    _case(tmp_path, example, "i", realistic=False, view_names=("ap", "lat"))
    case = io.read_case(tmp_path / "i")
    raw = json.loads((tmp_path / "i" / "case.json").read_text(encoding="utf-8"))
    assert raw["simulator"]["realistic"] is False and raw["simulator"]["distractors"] == []
    for view in case.views:
        assert view.metal == "bright"
        # fixed C-arm: source 600 mm from the isocentre, 1000 mm to the detector
        assert abs(view.K[0, 0]) == pytest.approx(1000.0 / (300.0 / 128), rel=1e-6)


def test_make_view_names():
    rng = np.random.default_rng(0)
    ap = simulate.make_view("ap", (0, 0, 0), rng)
    lat = simulate.make_view("lat", (0, 0, 0), rng)
    rao = simulate.make_view("rao20", (0, 0, 0), rng, realistic=False)
    assert abs(ap.axis[1]) > 0.99                 # AP: along anterior
    assert abs(lat.axis[0]) > 0.99                # lateral: along right-left
    assert np.degrees(np.arccos(abs(rao.axis[1]))) == pytest.approx(20.0, abs=4.0)
    with pytest.raises(ValueError, match="unknown view name"):
        simulate.make_view("sideways", (0, 0, 0), rng)


def test_cli_simulate(tmp_path):
    from PedicleScrewPoseLib import cli

    out = tmp_path / "cases"
    rc = cli.main(["simulate", "--out", str(out), "--n-cases", "1", "--seed", "4", "--views", "ap,lat",
                   "--size", "64", "--ideal", "--levels", "L1"])
    assert rc == 0
    case = io.read_case(out / "case_000")
    assert len(case.views) == 2 and case.images[0].shape == (64, 64)
    # refuses to overwrite; unknown view: one clear error, exit 1
    assert cli.main(["simulate", "--out", str(out), "--n-cases", "1", "--size", "64", "--ideal", "--levels", "L1"]) == 1
    assert cli.main(["simulate", "--out", str(tmp_path / "x"), "--views", "ap,up"]) == 1
