"""Axis search from head centres (axis_search) and the pipeline's second look, on the
simulator's label maps of bilateral screws that overlap in the lateral view."""
import numpy as np
import pytest
from test_pose import angle_deg, bilateral_screws, estimate_of, one_hot, small_views

from PedicleScrewPoseLib import axis_search, correspondence, instances, pipeline, pose, xray


@pytest.fixture(scope="module")
def scene():
    views = small_views()
    screws = bilateral_screws()
    probs = [one_hot(xray.label_map(screws, v)) for v in views]
    return views, screws, probs


def head_centre(s):
    est = estimate_of(s)
    return s.entry_mm - est.axis * est.head_height_mm / 2


def turned(est, deg, about=np.array([0.0, 0.0, 1.0])):
    """``est`` turned by ``deg`` about its head centre (axis ``about``, world)."""
    head = est.entry_mm - est.axis * est.head_height_mm / 2
    a = np.radians(deg)
    k = about / np.linalg.norm(about)
    R = np.cos(a) * np.eye(3) + np.sin(a) * np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]]) \
        + (1 - np.cos(a)) * np.outer(k, k)
    d = R @ est.axis
    entry = head + d * est.head_height_mm / 2
    return estimate_of_pose(est, entry, entry + d * est.length_mm)


def estimate_of_pose(est, entry, tip):
    from dataclasses import replace

    return replace(est, entry_mm=np.asarray(entry, float), tip_mm=np.asarray(tip, float))


def test_best_direction_is_the_best_supported(scene):
    views, screws, probs = scene
    for s in screws:
        d, support = axis_search.best_direction(views, probs, head_centre(s))
        true_support = axis_search.direction_support(views, probs, head_centre(s), estimate_of(s).axis)
        assert true_support > 0.9
        assert support >= true_support - 1e-9
    # From a point beside the spine no direction is supported by the views.
    _, support = axis_search.best_direction(views, probs, np.array([60.0, -60.0, 70.0]))
    assert support < 0.2


def test_alternative_turns_a_tilted_axis_back_and_leaves_a_right_one(scene):
    views, screws, probs = scene
    right = estimate_of(screws[0])
    wrong = turned(right, 20.0, about=np.array([1.0, 0.0, 0.0]))  # tilted cranially
    alts = axis_search.alternatives(views, probs, [right, wrong])
    assert alts[0] is None
    assert alts[1] is not None
    head = right.entry_mm - right.axis * right.head_height_mm / 2
    assert (axis_search.direction_support(views, probs, head, alts[1].axis) >
            axis_search.direction_support(views, probs, head, wrong.axis) + 0.2)
    # The head stays where it was.
    np.testing.assert_allclose(alts[1].entry_mm - alts[1].axis * alts[1].head_height_mm / 2,
                               right.entry_mm - right.axis * right.head_height_mm / 2, atol=1e-6)


def test_a_head_no_screw_explains_becomes_a_screw(scene):
    views, screws, probs = scene
    centre = correspondence.scene_centre(views)
    per_view = [instances.find_instances(p, i, mm_per_px=correspondence.mm_per_px_at(v, centre))
                for i, (p, v) in enumerate(zip(probs, views))]
    known = [estimate_of(s) for s in screws]
    assert axis_search.estimates_from_heads(views, probs, per_view, known) == []
    missing = screws[2]
    new = axis_search.estimates_from_heads(views, probs, per_view, known[:2] + known[3:])
    assert len(new) == 1
    truth = estimate_of(missing)
    # Head centre from the two head blobs; its direction is the best supported one (see above).
    np.testing.assert_allclose(new[0].entry_mm - new[0].axis * new[0].head_height_mm / 2, head_centre(missing),
                               atol=2.0)
    assert axis_search.direction_support(views, probs, head_centre(missing), new[0].axis) > 0.9


def test_second_look_corrects_a_screw_fitted_along_the_wrong_axis(scene):
    views, screws, probs = scene
    kept = pose.confidences(views, probs, [estimate_of(s) for s in screws])
    # Nothing to change where every screw is right.
    same = pipeline._second_look(views, probs, [[] for _ in views], kept, [None, None], [], "cpu")
    assert len(same) == len(kept)
    for a, b in zip(sorted(same, key=lambda e: tuple(e.entry_mm)), sorted(kept, key=lambda e: tuple(e.entry_mm))):
        np.testing.assert_allclose(a.tip_mm, b.tip_mm, atol=1e-6)
    kept[1] = pose.confidences(views, probs, kept[:1] + [turned(kept[1], 20.0, np.array([1.0, 0, 0]))] + kept[2:])[1]
    out = pipeline._second_look(views, probs, [[] for _ in views], kept, [None, None], [], "cpu")
    assert len(out) == len(screws)
    for s in screws:
        truth = estimate_of(s)
        best = min(out, key=lambda e: np.linalg.norm(e.entry_mm - truth.entry_mm))
        assert angle_deg(best.axis, truth.axis) < 2.0, s.id
        assert np.linalg.norm(best.tip_mm - truth.tip_mm) < 3.0, s.id  # was ~15 mm off
