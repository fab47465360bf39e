"""Instances: per-view screw segments from label maps of the simulator, crossing screws apart."""
import numpy as np
import pytest

from PedicleScrewPoseLib import geometry, instances, screw as sc, xray

ISO = (0.0, -20.0, 0.0)


def views(size=256, pixel_mm=1.2):
    return [geometry.ap_view(isocenter_mm=ISO, width=size, height=size, pixel_mm=pixel_mm),
            geometry.lateral_view(isocenter_mm=ISO, width=size, height=size, pixel_mm=pixel_mm)]


def make(entry, direction, d=6.5, L=45.0, sid="S"):
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    entry = np.asarray(entry, float)
    return sc.Screw(spec=sc.ScrewSpec.from_size(d, L),
                    T_world_from_screw=sc.pose_from_entry_tip(entry, entry + L * direction), id=sid)


def one_hot(lab):
    return np.stack([(lab == k) for k in range(3)]).astype(np.float32)


def mm_per_px(view):
    return float(geometry.depth(view.P / np.linalg.norm(view.P[2, :3]), np.array(ISO))[0]) / view.K[0, 0]


def crossing_pair():
    """Left screw tilted cranially, right caudally: an X in the lateral view."""
    a = make([-22, -40, 0], [np.sin(0.25), 1.0, np.tan(np.deg2rad(14))], sid="L")
    b = make([22, -40, 0], [-np.sin(0.25), 1.0, -np.tan(np.deg2rad(14))], sid="R")
    return [a, b]


def check_matches_truth(found, screws, view, tol_head_px, tol_tip_px):
    for s in screws:
        head_c = s.entry_mm - s.axis * s.spec.head_height_mm * 0.5
        h_true, t_true = geometry.project(view.P, np.array([head_c, s.tip_mm]))
        best = min(found, key=lambda i: np.linalg.norm(i.head_end_px - h_true) + np.linalg.norm(i.tip_px - t_true))
        assert np.linalg.norm(best.head_end_px - h_true) < tol_head_px, (s.id, best.head_end_px, h_true)
        assert np.linalg.norm(best.tip_px - t_true) < tol_tip_px, (s.id, best.tip_px, t_true)


def test_crossing_screws_in_the_lateral_view_come_apart():
    v = views()[1]
    screws = crossing_pair()
    lab = xray.label_map(screws, v)
    # One connected foreground blob: connected components alone would see one screw.
    from scipy import ndimage
    assert ndimage.label(lab > 0)[1] == 1
    found = [i for i in instances.find_instances(one_hot(lab), 1, mm_per_px=mm_per_px(v)) if i.has_head]
    assert len(found) == 2
    check_matches_truth(found, screws, v, tol_head_px=4.0, tol_tip_px=6.0)
    for i in found:
        assert i.view_index == 1
        assert i.width_px > 3.0
        assert 0.0 < i.score <= 1.0
        assert len(i.pixels) > 50


def test_touching_adjacent_levels_in_ap_come_apart():
    v = views()[0]
    # Two screws on one side, 16 mm apart: the caudal screw's head touches the cranial shaft.
    screws = [make([-22, -40, 0], [0.3, 1.0, -0.45], sid="A"), make([-22, -40, -16], [0.3, 1.0, 0.0], sid="B")]
    lab = xray.label_map(screws, v)
    found = [i for i in instances.find_instances(one_hot(lab), 0, mm_per_px=mm_per_px(v)) if i.has_head]
    assert len(found) == 2
    check_matches_truth(found, screws, v, tol_head_px=4.0, tol_tip_px=6.0)


def test_head_end_is_the_head():
    v = views()[1]
    s = make([20, -40, 0], [-0.2, 1.0, 0.1])
    lab = xray.label_map([s], v)
    (inst,) = instances.find_instances(one_hot(lab), 1, mm_per_px=mm_per_px(v))
    h, t = geometry.project(v.P, np.array([s.entry_mm, s.tip_mm]))
    # The head end is nearer the projected entry than the far end is.
    assert np.linalg.norm(inst.head_end_px - h) < np.linalg.norm(inst.tip_px - h)
    assert np.linalg.norm(inst.tip_px - t) < 5.0
    assert inst.has_head and inst.visible_fraction > 0.5


def test_empty_and_bad_probabilities():
    p = np.zeros((3, 32, 32), np.float32)
    p[0] = 1
    assert instances.find_instances(p) == []
    with pytest.raises(ValueError, match=r"\[3, v, u\]"):
        instances.find_instances(np.zeros((2, 32, 32)))
    p[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        instances.find_instances(p)


def test_calibration_beads_called_head_are_no_screw(monkeypatch):
    """A row of beads (2.4 mm balls) that a network labels head, and shaft at one end (as seen on
    a simulated image of a calibration phantom): thinner than any screw head."""
    v = views(size=384, pixel_mm=0.5)[0]
    s = make([-22, -40, 0], [np.sin(0.25), 1.0, 0.1])
    lab = xray.label_map([s], v)
    mmpx = mm_per_px(v)
    vv, uu = np.mgrid[: lab.shape[0], : lab.shape[1]]
    for k in range(8):  # beads 2 mm apart: one blob in the label map
        cu, cv = 270 + k * 2.0 / mmpx, 60
        lab[(uu - cu) ** 2 + (vv - cv) ** 2 <= (1.2 / mmpx) ** 2] = 1 if k < 4 else 2
    found = instances.find_instances(one_hot(lab), 0, mm_per_px=mmpx)
    assert len(found) == 1 and found[0].has_head
    check_matches_truth(found, [s], v, tol_head_px=4.0, tol_tip_px=6.0)
    # Without the rule the bead row is a head.
    monkeypatch.setattr(instances, "MIN_HEAD_INSCRIBED_MM", 0.0)
    assert len(instances.find_instances(one_hot(lab), 0, mm_per_px=mmpx)) == 2


def test_a_neighbours_shaft_reaching_this_head_is_not_this_screws_shaft():
    """AP view, one side, adjacent levels: the caudal screw is tilted cranially so that its shaft
    runs up to the cranial screw's head, while the cranial screw's own shaft is short (it points
    almost along the beam).  The cranial instance keeps its own short shaft."""
    v = views()[0]
    screws = [make([-22, -40, 0], [0.0, 1.0, 0.3], sid="A"), make([-22, -40, -26], [0.0, 1.0, 0.6], sid="B")]
    lab = xray.label_map(screws, v)
    found = [i for i in instances.find_instances(one_hot(lab), 0, mm_per_px=mm_per_px(v)) if i.has_head]
    assert len(found) == 2
    a, b = screws
    head_a, tip_a = geometry.project(v.P, np.array([a.entry_mm - a.axis * a.spec.head_height_mm * 0.5, a.tip_mm]))
    head_b = geometry.project(v.P, np.array([b.entry_mm - b.axis * b.spec.head_height_mm * 0.5]))[0]
    inst_a = min(found, key=lambda i: np.linalg.norm(i.head_end_px - head_a))
    assert np.linalg.norm(inst_a.head_end_px - head_a) < 4.0
    # Its far end lies on its own side of the head, not down on the neighbour's shaft.
    assert np.linalg.norm(inst_a.tip_px - tip_a) < np.linalg.norm(inst_a.tip_px - head_b)
    assert np.linalg.norm(inst_a.tip_px - tip_a) < 6.0
