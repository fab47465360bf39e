"""The run command end to end on small cases: accuracy with true label maps, the network path,
no screws, and bad inputs (one clear line, exit 1, no partial output folder)."""
import json

import numpy as np
import pytest

from PedicleScrewPoseLib import cli, evaluation, geometry, io, pipeline, pose, screw as sc, xray

ISO = (0.0, -20.0, 0.0)


def small_views(size=256, pixel_mm=1.2):
    return [geometry.ap_view(isocenter_mm=ISO, width=size, height=size, pixel_mm=pixel_mm),
            geometry.lateral_view(isocenter_mm=ISO, width=size, height=size, pixel_mm=pixel_mm)]


def bilateral(levels=2, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(levels):
        z = (i - (levels - 1) / 2) * 32.0
        for side, name in ((-1, "R"), (1, "L")):
            medial = np.deg2rad(rng.uniform(10, 18))
            axis = np.array([-side * np.sin(medial), np.cos(medial), np.sin(np.deg2rad(rng.uniform(-6, 6)))])
            entry = np.array([side * 22.0, -40.0 + rng.normal(0, 1.5), z])
            L = float(rng.choice([40.0, 45.0]))
            out.append(sc.Screw(spec=sc.ScrewSpec.from_size(6.5, L),
                                T_world_from_screw=sc.pose_from_entry_tip(entry, entry + L * axis / np.linalg.norm(axis)),
                                id=f"V{i}-{name}"))
    return out


def write_small_case(case_dir, screws, views=None, implants=True):
    """A case folder with images made from the label maps (metal bright) and the truth."""
    views = views or small_views()
    labels = [xray.label_map(screws, v) if screws else np.zeros((v.height, v.width), np.uint8) for v in views]
    rng = np.random.default_rng(0)
    images = [np.clip(60 + 150 * (lab > 0) + rng.normal(0, 5, lab.shape), 0, 255).astype(np.uint8) for lab in labels]
    log = [{"diameter_mm": s.spec.diameter_mm, "length_mm": s.spec.length_mm} for s in screws] if implants else None
    io.write_case(case_dir, views, images, implants=log)
    io.write_truth(case_dir, screws, {v.name: lab for v, lab in zip(views, labels)})
    return case_dir


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return write_small_case(tmp_path_factory.mktemp("cases") / "case", bilateral())


def test_run_with_true_labels_is_accurate(case_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(case_dir), "--out", str(out), "--truth-labels"]) == 0
    result = io.read_result(out)
    truth = io.read_truth(case_dir)
    ev = evaluation.evaluate(result, truth)
    assert ev["recall"] == 1.0 and ev["precision"] == 1.0
    assert ev["summary"]["angle_deg"]["median"] < 1.0
    assert ev["summary"]["segment_mm"]["median"] < 1.0
    assert ev["summary"]["segment_mm"]["max"] < 2.5
    for s in result["screws"]:
        T = np.asarray(s["transform"])
        assert np.allclose(T[:3, 3], s["entry_mm"], atol=1e-3)
        axis = np.subtract(s["tip_mm"], s["entry_mm"])
        assert np.allclose(T[:3, 2], axis / np.linalg.norm(axis), atol=1e-4)
        assert np.isclose(np.linalg.norm(axis), s["length_mm"], atol=1e-2)
        assert s["length_mm"] in (40.0, 45.0) and s["diameter_mm"] == 6.5
        assert set(s["views"]) == {"AP", "LAT"} and 0 < s["confidence"] <= 1
    for k in ("segmentation", "correspondence", "pose", "total"):
        assert result["timing_s"][k] >= 0
    for name in ("AP", "LAT"):
        lab = io.read_image(out / f"{name}_labels.png")
        assert lab.shape == (256, 256) and set(np.unique(lab)) <= {0, 1, 2}
        assert (out / f"{name}_overlay.png").exists() and (out / f"{name}_fit.png").exists()
    assert not list(case_dir.glob("result.json"))  # nothing written into the case
    assert "4 screws found" in capsys.readouterr().out
    # A second run into the same folder needs --overwrite.
    assert cli.main(["run", str(case_dir), "--out", str(out), "--truth-labels"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["run", str(case_dir), "--out", str(out), "--truth-labels", "--overwrite"]) == 0


def test_run_case_with_three_views_and_no_implant_log(tmp_path):
    views = small_views(size=192, pixel_mm=1.6) + [geometry.carm_view(
        "OBL", isocenter_mm=ISO, lao_deg=40, cranial_deg=15, width=192, height=192, pixel_mm=1.6)]
    screws = bilateral(levels=1, seed=5)
    case = io.read_case(write_small_case(tmp_path / "c3", screws, views=views, implants=False))
    probs = [pipeline.one_hot(io.read_truth_labels(case.root, v.name)) for v in case.views]
    result = pipeline.run_case(case, probabilities=probs, assess=False)
    ev = evaluation.evaluate(result, io.read_truth(case.root))
    assert ev["recall"] == 1.0 and ev["precision"] == 1.0
    assert ev["summary"]["segment_mm"]["max"] < 2.5
    # Sizes estimated from the images, snapped to the catalogue.
    for s in result["screws"]:
        assert 5.0 <= s["diameter_mm"] <= 8.0 and 35.0 <= s["length_mm"] <= 50.0
        assert set(s["views"]) == {"AP", "LAT", "OBL"}


def test_run_in_the_operating_rooms_geometry(tmp_path):
    """The patient prone: the AP view's source under the table (a PA projection) tilted 10 degrees
    cranially, the lateral from the patient's right and 6 degrees off, 4:5 images, detector roll
    and an off-centre principal point.  Nothing assumes the source's side or a square image."""
    views = [geometry.carm_view("AP", isocenter_mm=ISO, lao_deg=180.0, cranial_deg=10.0, width=240, height=192,
                                pixel_mm=1.3, principal_offset_px=(12.0, -9.0), detector_roll_deg=4.0),
             geometry.carm_view("LAT", isocenter_mm=ISO, lao_deg=-84.0, cranial_deg=-5.0, width=240, height=192,
                                pixel_mm=1.3, principal_offset_px=(-10.0, 6.0), detector_roll_deg=-3.0)]
    case = io.read_case(write_small_case(tmp_path / "prone", bilateral(levels=2, seed=8), views=views))
    probs = [pipeline.one_hot(io.read_truth_labels(case.root, v.name)) for v in case.views]
    result = pipeline.run_case(case, probabilities=probs, assess=False)
    ev = evaluation.evaluate(result, io.read_truth(case.root))
    assert ev["recall"] == 1.0 and ev["precision"] == 1.0
    assert ev["summary"]["angle_deg"]["median"] < 1.0
    assert ev["summary"]["segment_mm"]["median"] < 1.0
    for s in result["screws"]:
        for name, px in s["views"].items():
            assert 0 <= px["entry_px"][0] < 240 and 0 <= px["entry_px"][1] < 192


def test_run_with_the_network(case_dir, tmp_path):
    out = tmp_path / "net"
    assert cli.main(["run", str(case_dir), "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert result["format"] == "pedicle-screw-result/1"
    assert result["timing_s"]["segmentation"] > 0
    for s in result["screws"]:
        assert np.all(np.isfinite(s["entry_mm"])) and 0 <= s["confidence"] <= 1
    lab = io.read_image(out / "AP_labels.png")
    assert lab.shape == (256, 256)


def test_label_maps_take_the_fit_where_the_network_is_unsure(case_dir):
    """Where the network calls a screw's pixels background at a screw probability of 0.3, the
    label map of ``run`` takes them from the fitted screw; where it gives 0.05, they stay
    background; a blob with no fitted screw keeps the network's label."""
    case = io.read_case(case_dir)
    truth_maps = [io.read_truth_labels(case.root, v.name) for v in case.views]
    probs = [pipeline.one_hot(t) for t in truth_maps]
    lat, t_lat = probs[1], truth_maps[1]
    vv, uu = np.nonzero(t_lat == 2)
    cut = np.median(uu)
    unsure = (t_lat == 2) & (np.arange(t_lat.shape[1])[None, :] > cut)   # half of every shaft
    faint = unsure & (np.arange(t_lat.shape[0])[:, None] < np.median(vv))  # part of that half
    lat[:, unsure] = np.array([0.7, 0.0, 0.3], np.float32)[:, None]
    lat[:, faint] = np.array([0.95, 0.0, 0.05], np.float32)[:, None]
    lat[:, 5:12, 5:12] = np.array([0.0, 0.0, 1.0], np.float32)[:, None, None]  # a lone blob, no screw
    result, labels = pipeline.run_case(case, probabilities=probs, assess=False, with_labels=True)
    assert len(result["screws"]) == 4
    from PedicleScrewPoseLib import segmentation

    network = segmentation.labels_from_probabilities(lat)
    assert not network[unsure].any()
    assert (labels[1][unsure & ~faint] == 2).mean() > 0.9
    assert not labels[1][faint].any()
    assert (labels[1][5:12, 5:12] == 2).all()
    d_net, d_run = evaluation.dice_per_class(network, t_lat), evaluation.dice_per_class(labels[1], t_lat)
    assert d_run["shaft"] > d_net["shaft"] + 0.1
    # With the true maps in the AP view, the map run writes stays close to them.
    assert evaluation.dice_per_class(labels[0], truth_maps[0])["shaft"] > 0.9
    assert pipeline.run_case(case, probabilities=probs, assess=False).keys() == result.keys()


def test_a_ghost_far_beside_the_spine_is_dropped():
    """A fit whose entry lies 90 mm to the side of the other screws' midline is no pedicle screw
    and goes; a bilateral construct whose midline drifts 12 mm per level (scoliosis) stays whole,
    and so does a lone pair (too few neighbours to judge)."""
    def est(x, z, conf=0.9):
        entry = np.array([x, -40.0, z])
        axis = np.array([-np.sign(x) * 0.25, 1.0, 0.0])
        return pose.ScrewEstimate(entry_mm=entry, tip_mm=entry + 40.0 * axis / np.linalg.norm(axis),
                                  diameter_mm=6.5, length_mm=40.0, head_diameter_mm=11.0, head_height_mm=13.0,
                                  tip_length_mm=4.0, confidence=conf)

    construct = [est(shift + side * 22.0, z) for z, shift in ((0.0, 0.0), (30.0, 12.0), (60.0, 24.0))
                 for side in (-1, 1)]
    ghost = est(12.0 + 90.0, 30.0, conf=0.95)  # the most confident of all: only its place betrays it
    kept = pipeline._clean(construct + [ghost])
    assert len(kept) == len(construct) and not any(k is ghost for k in kept)
    assert len(pipeline._clean(construct)) == len(construct)
    pair = [est(-22.0, 0.0), est(22.0, 0.0)]
    assert len(pipeline._clean(pair)) == 2


def test_an_axis_across_the_level_is_dropped():
    """A fit whose axis runs 65° off its neighbours' (from one screw's head across the level) is
    no pedicle screw and goes; a construct whose vertebrae are all rotated 30° (scoliosis), with
    medial angles of 25°, stays whole, and so does a lone crossing pair (too few to judge)."""
    def est(x, z, yaw_deg, conf=0.9):
        entry = np.array([x, -40.0, z])
        yaw = np.radians(yaw_deg)
        axis = np.array([np.sin(yaw), np.cos(yaw), 0.0])
        return pose.ScrewEstimate(entry_mm=entry, tip_mm=entry + 40.0 * axis, diameter_mm=6.5, length_mm=40.0,
                                  head_diameter_mm=11.0, head_height_mm=13.0, tip_length_mm=4.0, confidence=conf)

    for turn in (0.0, 30.0):
        construct = [est(side * 22.0, z, turn - side * 25.0) for z in (0.0, 30.0, 60.0) for side in (-1, 1)]
        assert len(pipeline._clean(construct)) == len(construct)
        ghost = est(20.0, 35.0, turn - 65.0, conf=0.95)  # the most confident: only its direction betrays it
        kept = pipeline._clean(construct + [ghost])
        assert len(kept) == len(construct) and not any(k is ghost for k in kept)
    pair = [est(-22.0, 0.0, 60.0), est(22.0, 0.0, -60.0)]
    assert len(pipeline._clean(pair)) == 2


def test_candidates_off_the_segmentation_are_not_refined(case_dir):
    """The gate before refinement keeps triangulated screws that lie on the segmented screws
    in the views they were matched in, and drops one moved off them."""
    from PedicleScrewPoseLib import pose

    case = io.read_case(case_dir)
    probs = [pipeline.one_hot(io.read_truth_labels(case.root, v.name)) for v in case.views]
    truth = io.read_truth(case_dir)["screws"]

    def estimate(entry, tip, d, L):
        dims = pose.spec_dimensions(d, L)
        return pose.ScrewEstimate(entry_mm=np.asarray(entry, float), tip_mm=np.asarray(tip, float),
                                  diameter_mm=d, length_mm=L, head_diameter_mm=dims["head_diameter_mm"],
                                  head_height_mm=dims["head_height_mm"], tip_length_mm=dims["tip_length_mm"],
                                  members={0: 0, 1: 0})

    good = [estimate(s["entry_mm"], s["tip_mm"], s["diameter_mm"], s["length_mm"]) for s in truth]
    shift = np.array([0.0, 0.0, 60.0])  # between and beyond the levels: on background in both views
    bad = estimate(np.add(truth[0]["entry_mm"], shift), np.add(truth[0]["tip_mm"], shift),
                   truth[0]["diameter_mm"], truth[0]["length_mm"])
    kept = pipeline._gate(case.views, probs, good + [bad], "cpu")
    assert len(kept) == len(good) and all(k is g for k, g in zip(kept, good))
    assert pipeline._gate(case.views, probs, [], "cpu") == []


def test_clean_keeps_the_fit_of_one_screw_that_explains_its_metal(case_dir):
    """Two fits of one screw, the true one and one 10 mm too short inside it: with the images
    at hand the true one stays, whatever confidences the joint fit gave them (each one's pixels
    that the other explains are left out of its score, so the short one lost nothing there)."""
    case = io.read_case(case_dir)
    probs = [pipeline.one_hot(io.read_truth_labels(case.root, v.name)) for v in case.views]
    truth = io.read_truth(case_dir)["screws"]

    def estimate(entry, tip, d, L, conf):
        dims = pose.spec_dimensions(d, L)
        return pose.ScrewEstimate(entry_mm=np.asarray(entry, float), tip_mm=np.asarray(tip, float),
                                  diameter_mm=d, length_mm=L, head_diameter_mm=dims["head_diameter_mm"],
                                  head_height_mm=dims["head_height_mm"], tip_length_mm=dims["tip_length_mm"],
                                  confidence=conf)

    good = [estimate(s["entry_mm"], s["tip_mm"], s["diameter_mm"], s["length_mm"], 0.9) for s in truth]
    t0 = truth[0]
    axis = np.subtract(t0["tip_mm"], t0["entry_mm"]) / t0["length_mm"]
    short = estimate(t0["entry_mm"], np.add(t0["entry_mm"], axis * (t0["length_mm"] - 10.0)),
                     t0["diameter_mm"], t0["length_mm"] - 10.0, 0.95)
    kept = pipeline._clean(good + [short], case.views, probs, "cpu")
    assert len(kept) == len(good) and any(k is good[0] for k in kept) and not any(k is short for k in kept)
    # By the confidences alone, the short fit would have won.
    assert any(k is short for k in pipeline._clean(good + [short]))


def test_clean_merges_screws_whose_metal_would_overlap(monkeypatch):
    def est(entry, tip, conf, d=6.0):
        return pose.ScrewEstimate(entry_mm=np.array(entry, float), tip_mm=np.array(tip, float), diameter_mm=d,
                                  length_mm=40.0, head_diameter_mm=11.0, head_height_mm=12.0, tip_length_mm=3.0,
                                  confidence=conf)

    a = est([0, 0, 0], [0, 40, 0], 0.9)
    near = est([4.5, 0, 0], [4.5, 40, 0], 0.7)       # 4.5 mm apart, radii 3 + 3: one screw seen twice
    thin = est([6.0, 0, 0], [6.0, 40, 0], 0.7, d=2.0)  # radii 3 + 1: apart, and over SAME_ENTRY_MM
    other = est([30, 0, 0], [30, 40, 0], 0.8)         # the bilateral partner
    weak = est([60, 0, 0], [60, 40, 0], pipeline.MIN_CONFIDENCE - 0.01)
    kept = pipeline._clean([near, a, other, weak])
    assert kept == [a, other]
    assert pipeline._clean([a, thin]) == [a, thin]
    # The same screw fitted twice, once 10 mm too short: the short one lies inside the other's metal.
    short = est([0.5, 0, 0], [0.5, 30, 0], 0.6)
    short.length_mm = 30.0
    assert pipeline._clean([a, short]) == [a]
    # Or fitted twice from one entry, 22 deg apart (seen end-on in AP): the shafts share less than
    # SAME_SCREW_OVERLAP of their metal, but no two heads fit 2.7 mm apart.
    turned = est([2.7, 0, 0], [2.7 + 40 * np.sin(np.radians(22)), 40 * np.cos(np.radians(22)), 0], 0.6)
    assert pipeline._clean([a, turned]) == [a]
    monkeypatch.setattr(pipeline, "SAME_ENTRY_MM", 0.0)
    assert pipeline._clean([a, turned]) == [a, turned]  # the overlap rule alone keeps both
    monkeypatch.undo()
    # Or slid 9 mm along its axis (metal shared along 31 of 40 mm); 25 mm along, they are two.
    slid = est([0, 9, 0], [0, 49, 0], 0.6)
    assert pipeline._clean([a, slid]) == [a]
    far_along = est([0, 25, 0], [0, 65, 0], 0.6)
    assert pipeline._clean([a, far_along]) == [a, far_along]
    # Bilateral screws converging to within 5 mm at their tips stay two (only the tips are close).
    left = est([-20, 0, 0], [-3, 36, 0], 0.8)
    right = est([20, 0, 0], [3, 36, 0], 0.8)
    assert pipeline._clean([left, right]) == [left, right]
    # A confident fit pointing out to the side (80° from anterior) or backwards is no pedicle screw.
    sideways = est([0, 0, 50], [39.4, 6.9, 50], 0.95)
    backwards = est([0, 40, 90], [0, 0, 90], 0.95)
    assert pipeline._clean([a, sideways, backwards]) == [a]


def test_clean_drops_a_screw_whose_head_lies_in_front_of_the_spine():
    def est(x, y, z, conf=0.8):
        return pose.ScrewEstimate(entry_mm=np.array([x, y, z], float), tip_mm=np.array([x * 0.8, y + 40, z], float),
                                  diameter_mm=6.0, length_mm=40.0, head_diameter_mm=11.0, head_height_mm=12.0,
                                  tip_length_mm=3.0, confidence=conf)

    spine = [est(side * 22, 0.1 * z, z) for z in (0, 30, 60) for side in (-1, 1)]  # three levels, both sides
    ghost = est(5, 60, 30, conf=0.9)     # a pairing of two screws' instances, out in the abdomen
    deep = est(-22, 28, 90)              # 22 mm in front of its neighbours (y 6 at z 60): kept
    kept = {id(k) for k in pipeline._clean(spine + [ghost, deep])}
    assert id(ghost) not in kept and id(deep) in kept and all(id(s) in kept for s in spine)
    # Too few neighbours at its height to judge: kept.
    assert id(ghost) in {id(k) for k in pipeline._clean([spine[0], ghost])}


def test_no_screws_gives_an_empty_list(tmp_path):
    case = write_small_case(tmp_path / "empty", [])
    out = tmp_path / "out"
    assert cli.main(["run", str(case), "--out", str(out), "--truth-labels"]) == 0
    result = io.read_result(out)
    assert result["screws"] == [] and result["unmatched"] == []
    assert (out / "AP_fit.png").exists()


def _broken_copy(case_dir, tmp_path, edit):
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(case_dir, dst)
    doc = json.loads((dst / "case.json").read_text(encoding="utf-8"))
    edit(doc, dst)
    (dst / "case.json").write_text(json.dumps(doc))
    return dst


def _assert_fails_cleanly(case, tmp_path, capsys, expect):
    out = tmp_path / "out"
    assert cli.main(["run", str(case), "--out", str(out), "--truth-labels"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left


def test_bad_inputs_fail_cleanly(case_dir, tmp_path, capsys):
    _assert_fails_cleanly(tmp_path / "nope", tmp_path, capsys, "does not exist")

    def missing_image(doc, d):
        (d / doc["views"][1]["image"]).unlink()
    _assert_fails_cleanly(_broken_copy(case_dir, tmp_path / "a", missing_image), tmp_path / "a", capsys,
                          "does not exist")

    def singular(doc, d):
        doc["views"][0]["projection_matrix"] = [[1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 1]]
    _assert_fails_cleanly(_broken_copy(case_dir, tmp_path / "b", singular), tmp_path / "b", capsys, "singular")

    def nan(doc, d):
        doc["views"][1]["projection_matrix"][0][0] = float("nan")
    _assert_fails_cleanly(_broken_copy(case_dir, tmp_path / "c", nan), tmp_path / "c", capsys, "projection_matrix")

    # Output inside the case folder is refused.
    assert cli.main(["run", str(case_dir), "--out", str(case_dir / "out"), "--truth-labels"]) == 1
    assert not (case_dir / "out").exists()


def test_probabilities_must_fit_the_views(case_dir):
    case = io.read_case(case_dir)
    with pytest.raises(ValueError, match="shape"):
        pipeline.run_case(case, probabilities=[np.zeros((3, 10, 10), np.float32)] * 2)
    with pytest.raises(ValueError, match="2 views"):
        pipeline.run_case(case, probabilities=[np.zeros((3, 256, 256), np.float32)])
