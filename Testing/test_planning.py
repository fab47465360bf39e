"""Planning on the example CT: bilateral trajectories inside the pedicles, breach, misplacement.

Checks are made against the original label grid (0.7 x 0.7 x 2.5 mm), independently
of the planner's own resampled 1 mm map.
"""
import numpy as np
import pytest
from scipy import ndimage

from PedicleScrewPoseLib import ct as C
from PedicleScrewPoseLib import planning as P
from PedicleScrewPoseLib import screw as S

LEVELS = ("T10", "T11", "T12", "L1", "L2", "L3")


@pytest.fixture(scope="module")
def example():
    return C.example_ct()


@pytest.fixture(scope="module")
def planned(example):
    return P.plan_screws(example[1])


def _label_at(labels, world_mm):
    ijk = np.round(labels.ras_to_ijk_points(world_mm)).astype(int)
    shape = labels.array.shape[::-1]
    ok = np.all((ijk >= 0) & (ijk < shape), axis=1)
    out = np.zeros(len(ijk), dtype=int)
    out[ok] = labels.array[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]]
    return out


def _independent_breach(labels, screw):
    """Max distance (mm) from the thread envelope to the nearest label voxel, on the original grid.

    Distances run to voxel centres, so this reads up to about half a voxel more than the
    planner's (whose boundary lies half-way between voxels).
    """
    v = labels.value_of(screw.level)
    k, j, i = np.nonzero(np.asarray(labels.array) == v)
    sl = (slice(max(0, k.min() - 8), k.max() + 9), slice(max(0, j.min() - 25), j.max() + 26),
          slice(max(0, i.min() - 25), i.max() + 26))
    m = np.asarray(labels.array[sl]) == v
    dist = ndimage.distance_transform_edt(~m, sampling=labels.spacing_mm[::-1]).astype(np.float32)
    pts = S.outer_surface_points(screw.spec, n_around=32)
    pts = pts[pts[:, 2] >= P.ENTRY_SKIP_MM]
    ijk = labels.ras_to_ijk_points(screw.to_world(pts))
    coords = np.stack([ijk[:, 2] - sl[0].start, ijk[:, 1] - sl[1].start, ijk[:, 0] - sl[2].start])
    return float(ndimage.map_coordinates(dist, coords, order=1, mode="nearest").max())


def test_twelve_bilateral_screws_with_ids(planned):
    assert len(planned) == 12
    assert [s.id for s in planned] == [f"{lv}-{sd}" for lv in LEVELS for sd in ("L", "R")]
    for s in planned:
        assert s.level == s.id.split("-")[0]
        assert s.side == ("left" if s.id.endswith("-L") else "right")
        assert 4.0 <= s.spec.diameter_mm <= 8.5 and 25.0 <= s.spec.length_mm <= 60.0
        assert s.spec.diameter_mm <= 0.8 * s.extra["plan"]["isthmus_width_mm"] + 1e-9
        assert s.breach_mm is not None


def test_shafts_inside_their_vertebra_and_sides_right(example, planned):
    ct, labels = example
    for s in planned:
        v = labels.value_of(s.level)
        z = np.linspace(P.ENTRY_SKIP_MM, s.spec.length_mm, 60)
        axis = s.to_world(np.c_[np.zeros_like(z), np.zeros_like(z), z])
        assert np.mean(_label_at(labels, axis) == v) >= 0.95, s.id
        env = S.outer_surface_points(s.spec, n_around=16)
        env = env[env[:, 2] >= P.ENTRY_SKIP_MM]
        assert np.mean(_label_at(labels, s.to_world(env)) == v) >= 0.85, s.id
        # On the CT the axis runs through (this patient's rather soft) bone: denser than the
        # tissue 40 mm lateral and 20 mm posterior of it.
        beside = axis + [40.0 if s.side == "right" else -40.0, -20.0, 0.0]
        hu, hu_beside = np.median(ct.sample(axis, order=1)), np.median(ct.sample(beside, order=1))
        assert hu > 40 and hu > hu_beside + 20, (s.id, hu, hu_beside)
    # Patient's right is RAS +x: each right screw's entry lies right of its partner's.
    by_id = {s.id: s for s in planned}
    for lv in LEVELS:
        assert by_id[f"{lv}-R"].entry_mm[0] > by_id[f"{lv}-L"].entry_mm[0] + 15


def test_trajectories_converge_medially(example, planned):
    _, labels = example
    by_id = {s.id: s for s in planned}
    for lv in LEVELS:
        left, right = by_id[f"{lv}-L"], by_id[f"{lv}-R"]
        T = P.vertebra_frame(labels, lv)
        R = T[:3, :3]
        for s, sign in ((left, -1.0), (right, 1.0)):
            a = R.T @ s.axis  # frame: x patient right, y anterior, z superior
            assert a[1] > 0.85, s.id  # goes anteriorly
            medial_deg = np.degrees(np.arctan2(-sign * a[0], a[1]))
            assert 3.0 <= medial_deg <= 27.0, (s.id, medial_deg)
        # Tips closer together than entries, and the two tips stay apart (no crossing).
        gap_entry = np.linalg.norm((left.entry_mm - right.entry_mm) @ R[:, 0])
        gap_tip = (right.tip_mm - left.tip_mm) @ R[:, 0]
        assert 0 < gap_tip < gap_entry - 5, lv


def test_planned_breach_small_and_independent(example, planned):
    _, labels = example
    for s in planned:
        assert s.breach_mm <= 0.6, s.id
        assert s.breach_mm == pytest.approx(P.breach_distance_mm(s, labels))
        if s.level != "L3":  # L3 is cut by the CT's lower edge
            assert _independent_breach(labels, s) <= 1.3, s.id


@pytest.mark.parametrize("screw_id,direction,distance", [
    ("T11-L", "medial", 3.0), ("L1-R", "lateral", 4.0), ("T12-R", "cranial", 2.0), ("L2-L", "caudal", 5.0),
    ("L2-R", "medial", 6.0)])
def test_misplacement_reaches_requested_breach(example, planned, screw_id, direction, distance):
    _, labels = example
    s = {x.id: x for x in planned}[screw_id]
    m = P.misplace(s, direction, distance, labels)
    assert m is not s and np.allclose(s.T_world_from_screw, {x.id: x for x in planned}[screw_id].T_world_from_screw)
    assert m.breach_mm == pytest.approx(distance, abs=0.3)
    assert m.extra["misplacement"]["direction"] == direction
    indep = _independent_breach(labels, m)
    assert distance - 0.5 <= indep <= distance + 1.5, indep
    # Moved the asked way, perpendicular to the axis, axis unchanged.
    shift = m.entry_mm - s.entry_mm
    assert np.allclose(m.axis, s.axis) and abs(shift @ s.axis) < 1e-6
    R = P.vertebra_frame(labels, s.level)[:3, :3]
    f = R.T @ shift
    sign = 1.0 if s.side == "right" else -1.0
    expect = {"medial": -sign * f[0], "lateral": sign * f[0], "cranial": f[2], "caudal": -f[2]}[direction]
    assert expect > 0.8 * np.linalg.norm(f)


def test_random_plans_vary_and_are_reproducible(example):
    _, labels = example
    a = P.plan_screws(labels, levels=("T12", "L1"), rng=3)
    b = P.plan_screws(labels, levels=("T12", "L1"), rng=3)
    c = P.plan_screws(labels, levels=("T12", "L1"), rng=4)
    assert [s.to_truth_dict() for s in a] == [s.to_truth_dict() for s in b]
    assert any(not np.allclose(x.T_world_from_screw, y.T_world_from_screw) for x, y in zip(a, c))
    assert all(s.breach_mm <= 0.6 for s in a + c)
    mis = P.plan_screws(labels, levels=("T12", "L1"), rng=0, misplacement={"L1-L": ("lateral", 3.0)})
    by_id = {s.id: s for s in mis}
    assert by_id["L1-L"].breach_mm == pytest.approx(3.0, abs=0.3) and by_id["T12-L"].breach_mm <= 0.6


def test_bad_input(example):
    _, labels = example
    with pytest.raises(ValueError, match="names none of the levels"):
        P.plan_screws(C.LabelVolume(np.zeros((4, 4, 4), np.uint8), np.eye(4), names={}))
    s = S.Screw(S.ScrewSpec.from_size(6.0, 40.0), np.eye(4), id="X", level="L9", side="left")
    with pytest.raises(ValueError, match="L9"):
        P.misplace(s, "medial", 2.0, labels)
    with pytest.raises(ValueError, match="direction"):
        P.misplace(s, "anterior", 2.0, labels)
    with pytest.raises(FileNotFoundError, match="no_such_labels.nii.gz"):
        C.load_labels("/nonexistent/no_such_labels.nii.gz")
