"""Clinical read-out: level, side (also on a rotated spine), breach grade and direction, uncertainty.

Runs on the real example CT's vertebra labels (T12, L1), with screws from planning.py.
"""
import math

import numpy as np
import pytest

from PedicleScrewPoseLib import assessment as A
from PedicleScrewPoseLib import ct as ctm
from PedicleScrewPoseLib import geometry, planning

LEVELS = ("T12", "L1")


def _result_entry(s, confidence=0.95):
    return {"id": s.id, "entry_mm": s.entry_mm.tolist(), "tip_mm": s.tip_mm.tolist(),
            "diameter_mm": s.spec.diameter_mm, "length_mm": s.spec.length_mm,
            "transform": s.T_world_from_screw.tolist(), "confidence": confidence}


@pytest.fixture(scope="module")
def example():
    ct, labels = ctm.example_ct()
    screws = planning.plan_screws(labels, levels=LEVELS)
    anatomy = A.Anatomy(labels, None, bone="label")
    return labels, screws, anatomy


@pytest.fixture(scope="module")
def assessed(example):
    labels, screws, anatomy = example
    return A.assess_screws([_result_entry(s) for s in screws], None, labels, anatomy=anatomy)


def test_planned_screws_level_side_and_contained(example, assessed):
    labels, screws, _ = example
    assert len(screws) == 4
    for s, out in zip(screws, assessed):
        assert out["level"] == s.level
        assert out["side"] == s.side
        assert out["level_fraction"] > 0.9
        b = out["breach"]
        assert b["grade"] == "A", (s.id, b)
        assert b["max_mm"] <= A.CONTAINED_TOLERANCE_MM
        assert abs(b["max_mm"] - s.breach_mm) < 0.5  # same definition as planning's truth
        assert b["medial_flag"] is False
        t = out["trajectory"]
        # Planned trajectories converge medially by 5-25 degrees, near parallel to the endplates.
        assert 0.0 < t["transverse_angle_deg"] < 30.0, t
        assert abs(t["sagittal_angle_deg"]) < 20.0, t
        assert t["entry_offset_mm"] is not None and t["entry_offset_mm"] < 5.0, t
    # Input entries are not modified; the output keeps their fields.
    assert "breach" not in _result_entry(screws[0])
    assert assessed[0]["id"] == screws[0].id and assessed[0]["confidence"] == 0.95


def test_vertebra_frame_is_anatomical(example):
    labels, _, anatomy = example
    for name in LEVELS:
        v = anatomy.vertebra(labels.value_of(name))
        R = v.T_world_from_vertebra[:3, :3]
        assert np.allclose(R.T @ R, np.eye(3), atol=1e-6) and np.linalg.det(R) > 0
        # The example patient lies supine, roughly aligned with the scanner: right ~ +x, superior ~ +z.
        assert R[:, 0] @ [1, 0, 0] > 0.9
        assert R[:, 2] @ [0, 0, 1] > 0.8
        assert set(v.pedicle_centres_mm) == {"left", "right"}
        assert v.side_of(v.pedicle_centres_mm["right"]) == "right"
        assert v.side_of(v.pedicle_centres_mm["left"]) == "left"
        # The spinal canal: a hole of a plausible size behind the body, between the pedicles.
        area = v.canal_xy.sum() * v._canal_step ** 2
        assert 100.0 < area < 500.0, area
        peds = np.array([v.to_frame(c)[0] for c in v.pedicle_centres_mm.values()])
        centre = np.array([0.0, peds[:, 1].mean() - 2.0, peds[:, 2].mean()])
        T = v.T_world_from_vertebra
        assert v.canal_depth_mm(T[:3, :3] @ centre + T[:3, 3])[0] > 3.0
        assert v.canal_depth_mm(v.pedicle_centres_mm["right"])[0] == 0.0


@pytest.mark.parametrize("axis,deg", [((0, 0, 1), 180.0), ((1, 2, 3), 130.0)])
def test_rotated_spine_keeps_level_and_side(example, assessed, axis, deg):
    labels, screws, _ = example
    Q = np.eye(4)
    Q[:3, :3] = geometry.rotation_matrix(axis, deg)
    Q[:3, 3] = [12.0, -25.0, 40.0]
    rot_labels = ctm.LabelVolume(labels.array, Q @ labels.ijk_to_ras, names=labels.names)
    rot = []
    for s in screws:
        e = Q[:3, :3] @ s.entry_mm + Q[:3, 3]
        t = Q[:3, :3] @ s.tip_mm + Q[:3, 3]
        rot.append({"id": s.id, "entry_mm": e.tolist(), "tip_mm": t.tolist(),
                    "diameter_mm": s.spec.diameter_mm, "length_mm": s.spec.length_mm})
    out = A.assess_screws(rot, None, rot_labels)
    for s, o, o0 in zip(screws, out, assessed):
        assert o["level"] == s.level
        assert o["side"] == s.side  # world +x is no longer the patient's right here
        assert abs(o["breach"]["signed_mm"] - o0["breach"]["signed_mm"]) < 0.35
        assert abs(o["trajectory"]["transverse_angle_deg"] - o0["trajectory"]["transverse_angle_deg"]) < 2.0


def test_grade_boundaries():
    g = A.grade_from_breach_mm
    assert g(None) is None
    assert [g(x) for x in (0.0, 0.3, A.CONTAINED_TOLERANCE_MM)] == ["A", "A", "A"]
    assert [g(x) for x in (0.51, 1.0, 1.999)] == ["B", "B", "B"]
    assert [g(x) for x in (2.0, 3.999)] == ["C", "C"]
    assert [g(x) for x in (4.0, 5.999)] == ["D", "D"]
    assert [g(x) for x in (6.0, 12.0)] == ["E", "E"]
    with pytest.raises(ValueError, match="finite"):
        g(float("nan"))


def test_grade_range_straddles_boundaries():
    assert A.grade_range(1.8, 0.5) == ("B", "C")
    assert A.grade_range(1.2, 0.5) == ("B", "B")
    assert A.grade_range(-2.0, 0.5) == ("A", "A")  # 2 mm clearance: contained whatever the error
    assert A.grade_range(-0.2, 1.0) == ("A", "B")
    assert A.grade_range(5.0, 1.5) == ("C", "E")
    assert A.grade_range(None, 1.0) == (None, None)
    # Confidence maps to a pose sigma that grows as confidence falls.
    assert A.sigma_from_confidence(1.0) < A.sigma_from_confidence(0.5) < A.sigma_from_confidence(0.0)
    assert A.sigma_from_confidence(None) is None


@pytest.fixture(scope="module")
def medial_screw(example):
    labels, screws, _ = example
    s = next(s for s in screws if s.id == "T12-L")
    return planning.misplace(s, "medial", 3.0, labels)


def test_medial_misplacement_flagged_with_right_grade(example, medial_screw):
    labels, _, anatomy = example
    assert medial_screw.breach_mm == pytest.approx(3.0, abs=0.1)
    out = A.assess_screws([_result_entry(medial_screw)], None, labels, pose_sigma=0.0, anatomy=anatomy)[0]
    b = out["breach"]
    assert out["level"] == "T12" and out["side"] == "left"
    assert b["grade"] == "C"
    assert b["max_mm"] == pytest.approx(3.0, abs=0.4)
    assert b["direction"] == "medial"
    assert b["medial_flag"] is True
    assert b["grade_uncertain"] is False and b["grade_range"] == ["C", "C"]


def test_lateral_misplacement_not_flagged_medial(example):
    labels, screws, anatomy = example
    s = next(s for s in screws if s.id == "L1-R")
    m = planning.misplace(s, "lateral", 5.0, labels)
    b = A.assess_screws([_result_entry(m)], None, labels, pose_sigma=0.0, anatomy=anatomy)[0]["breach"]
    assert b["grade"] == "D"
    assert b["direction"] == "lateral"
    assert b["medial_flag"] is False


def test_uncertainty_straddling_reported(example, medial_screw):
    labels, _, anatomy = example
    entry = _result_entry(medial_screw)
    out = A.assess_screws([entry], None, labels, pose_sigma=1.5, anatomy=anatomy)[0]["breach"]
    assert out["grade"] == "C"
    assert out["grade_uncertain"] is True and out["grade_range"] == ["B", "D"]
    assert out["sigma_mm"] == 1.5
    # Without an explicit sigma the confidence sets it: a low-confidence pose is uncertain ...
    low = A.assess_screws([{**entry, "confidence": 0.2}], None, labels, anatomy=anatomy)[0]["breach"]
    assert low["grade_uncertain"] is True and low["sigma_mm"] == pytest.approx(A.sigma_from_confidence(0.2))
    # ... and an explicit per-screw sigma wins over the confidence.
    sure = A.assess_screws([{**entry, "confidence": 0.2, "pose_sigma_mm": 0.1}], None, labels,
                           anatomy=anatomy)[0]["breach"]
    assert sure["grade_uncertain"] is False and sure["grade_range"] == ["C", "C"]


def test_ct_bone_trims_label_rim():
    """With the CT, the bone is the label minus its dark rim: never larger than the label."""
    ct, labels = ctm.example_ct()
    anatomy = A.Anatomy(labels, ct, bone="ct", margin_mm=8.0)
    v = anatomy.vertebra(labels.value_of("L1"))
    assert v.bone_mask.sum() < v.label_mask.sum()
    assert not np.any(v.bone_mask & ~v.label_mask)
    # The rim removed is thin: most of the label is bone.
    assert v.bone_mask.sum() > 0.8 * v.label_mask.sum()


def _box_sdf_errors(factor):
    """Signed-distance errors (mm) of a box whose faces lie half-way between the voxels of a grid
    with 2.5 mm slices, upsampled along the slices by ``factor``: points facing a face, <= 5 mm away."""
    spacing = np.array([2.5, 0.7, 0.7])  # (k, j, i) mm, like the example CT
    coarse = np.zeros((16, 40, 40), np.float32)
    coarse[4:12, 10:30, 10:30] = 1.0  # faces at indices 3.5 / 11.5 (k), 9.5 / 29.5 (j, i)
    fine = A._upsample_linear(coarse, 0, factor) >= 0.5
    fine_spacing = (2.5 / factor, 0.7, 0.7)
    sd = A._signed_distance(fine, fine_spacing)
    pos = np.argwhere(np.ones(fine.shape, bool)) * np.array(fine_spacing)  # mm, from voxel [0,0,0]
    lo = np.array([3.5, 9.5, 9.5]) * spacing
    hi = np.array([11.5, 29.5, 29.5]) * spacing
    # Points above / below the k faces within the face's footprint (away from edges), outside, and
    # inside points nearer a k face than any other face.
    inside_fp = np.all((pos[:, 1:] > lo[1:] + 1.5) & (pos[:, 1:] < hi[1:] - 1.5), axis=1)
    exact = np.maximum(lo[0] - pos[:, 0], pos[:, 0] - hi[0])
    side = np.min(np.concatenate([pos[:, 1:] - lo[1:], hi[1:] - pos[:, 1:]], axis=1), axis=1)
    sel = inside_fp & (exact <= 5.0) & (np.abs(exact) > 0.2) & ((exact > 0) | (-exact < side))
    return sd.reshape(-1)[sel] - exact[sel]


def test_signed_distance_of_thick_slices_is_exact_for_odd_factors():
    """Upsampling thick slices by an odd factor puts the surface half-way between slices (as the
    interpolated label says); an even factor would put samples exactly at 0.5 and move it out."""
    f = A._odd_factor(2.5 / 0.7)
    assert f % 2 == 1 and A._odd_factor(2.5 / 0.5) == 5 and A._odd_factor(0.703 / 0.7) == 1
    err = _box_sdf_errors(f)
    assert len(err) > 1000
    assert np.max(np.abs(err)) < 0.05
    assert np.max(np.abs(_box_sdf_errors(4))) > 0.25  # what the odd factor avoids


def test_bad_input_is_named():
    ct, labels = ctm.example_ct()
    anatomy = A.Anatomy(labels, None, bone="label")
    with pytest.raises(ValueError, match="diameter_mm"):
        A.assess_screws([{"entry_mm": [0, 0, 0], "tip_mm": [0, 0, 40]}], None, labels, anatomy=anatomy)
    with pytest.raises(ValueError, match=r"screws\[0\].tip_mm"):
        A.assess_screws([{"entry_mm": [0, 0, 0], "tip_mm": [0, 0], "diameter_mm": 6.0}], None, labels,
                        anatomy=anatomy)
    with pytest.raises(ValueError, match="label volume"):
        A.assess_screws([], None, None)
    with pytest.raises(ValueError, match="names no vertebrae"):
        A.Anatomy(ctm.LabelVolume(labels.array, labels.ijk_to_ras, names={1: "spleen"}))
    assert A.level_index("T12") == 18 and A.level_index("L1") == 20 and A.level_index("spleen") is None
    assert math.isclose(A.sigma_from_confidence(2.0), A.sigma_from_confidence(1.0))
