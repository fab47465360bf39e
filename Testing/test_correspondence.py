"""Correspondence across views: crossing and superimposed screws, screws seen in one view only."""
import numpy as np

from PedicleScrewPoseLib import correspondence, geometry, instances, screw as sc, xray

ISO = (0.0, -20.0, 0.0)


def make(entry, direction, d=6.5, L=45.0, sid="S"):
    direction = np.asarray(direction, float) / np.linalg.norm(direction)
    entry = np.asarray(entry, float)
    return sc.Screw(spec=sc.ScrewSpec.from_size(d, L),
                    T_world_from_screw=sc.pose_from_entry_tip(entry, entry + L * direction), id=sid)


def one_hot(lab):
    return np.stack([(lab == k) for k in range(3)]).astype(np.float32)


def run(views, screws, axis_prior=None):
    probs = [one_hot(xray.label_map(screws, v)) for v in views]
    c = correspondence.scene_centre(views)
    per_view = [instances.find_instances(p, i, mm_per_px=correspondence.mm_per_px_at(v, c))
                for i, (p, v) in enumerate(zip(probs, views))]
    matches, unmatched = correspondence.match_instances(views, per_view, probs, axis_prior=axis_prior)
    return per_view, matches, unmatched


def head_centre(s):
    return s.entry_mm - s.axis * s.spec.head_height_mm / 2


def assert_each_screw_found_once(matches, screws, tol_mm=5.0):
    assert len(matches) == len(screws)
    used = set()
    for s in screws:
        d = [np.linalg.norm(m.head_mm - head_centre(s)) for m in matches]
        k = int(np.argmin(d))
        assert d[k] < tol_mm, (s.id, d[k])
        assert k not in used
        used.add(k)
        assert np.linalg.norm(matches[k].tip_mm - s.tip_mm) < 2 * tol_mm


def test_scene_centre_is_the_isocentre():
    views = [geometry.ap_view(isocenter_mm=ISO), geometry.lateral_view(isocenter_mm=ISO)]
    assert np.allclose(correspondence.scene_centre(views), ISO, atol=1e-6)


def test_bilateral_screws_crossing_in_the_lateral_view():
    views = [geometry.ap_view(isocenter_mm=ISO, width=256, height=256, pixel_mm=1.2),
             geometry.lateral_view(isocenter_mm=ISO, width=256, height=256, pixel_mm=1.2)]
    screws = [make([-22, -40, 0], [np.sin(0.25), 1.0, np.tan(np.deg2rad(14))], sid="L"),
              make([22, -40, 0], [-np.sin(0.25), 1.0, -np.tan(np.deg2rad(14))], sid="R"),
              make([-22, -40, 32], [np.sin(0.25), 1.0, 0.05], sid="L2"),
              make([22, -40, 32], [-np.sin(0.25), 1.0, 0.05], sid="R2")]
    per_view, matches, unmatched = run(views, screws)
    assert_each_screw_found_once(matches, screws)
    assert unmatched == []


def test_superimposed_screws_share_one_lateral_blob():
    """Left and right screws nearly on top of each other in the lateral view: one lateral
    instance explains two AP instances (many-to-one)."""
    views = [geometry.ap_view(isocenter_mm=ISO, width=256, height=256, pixel_mm=1.2),
             geometry.lateral_view(isocenter_mm=ISO, width=256, height=256, pixel_mm=1.2)]
    screws = [make([-22, -40, 0], [np.sin(0.2), 1.0, 0.02], sid="L"),
              make([22, -40, 0], [-np.sin(0.2), 1.0, 0.02], sid="R")]
    per_view, matches, unmatched = run(views, screws)
    assert len([i for i in per_view[1] if i.has_head]) == 1  # one head blob in the lateral view
    assert_each_screw_found_once(matches, screws)
    lat_members = {m.members[1] for m in matches}
    assert len(lat_members) == 1


def test_screw_in_one_view_only_is_unmatched():
    # The lateral detector is short (128 rows): a screw 70 mm superior is outside its field.
    views = [geometry.ap_view(isocenter_mm=ISO, width=256, height=256, pixel_mm=1.2),
             geometry.lateral_view(isocenter_mm=ISO, width=256, height=128, pixel_mm=1.2)]
    screws = [make([-22, -40, 0], [np.sin(0.25), 1.0, 0.0], sid="seen"),
              make([22, -40, 72], [-np.sin(0.25), 1.0, 0.0], sid="AP only")]
    per_view, matches, unmatched = run(views, screws)
    assert len(matches) == 1
    assert np.linalg.norm(matches[0].head_mm - head_centre(screws[0])) < 5
    assert len(unmatched) == 1
    u = unmatched[0]
    assert u.view_index == 0
    assert u.reason == correspondence.REASON_OUTSIDE
    assert np.linalg.norm(per_view[0][u.instance_index].head_end_px -
                          geometry.project(views[0].P, head_centre(screws[1]))) < 5


def test_three_views_match_all_and_use_every_view():
    views = [geometry.ap_view(isocenter_mm=ISO, width=192, height=192, pixel_mm=1.6),
             geometry.lateral_view(isocenter_mm=ISO, width=192, height=192, pixel_mm=1.6),
             geometry.carm_view("OBL", isocenter_mm=ISO, lao_deg=40, cranial_deg=15, width=192, height=192,
                                pixel_mm=1.6)]
    screws = [make([-22, -40, 0], [np.sin(0.25), 1.0, 0.1], sid="L"),
              make([22, -40, 0], [-np.sin(0.25), 1.0, 0.1], sid="R"),
              make([-22, -40, -32], [np.sin(0.25), 1.0, -0.05], sid="L2")]
    per_view, matches, unmatched = run(views, screws)
    assert_each_screw_found_once(matches, screws)
    assert all(len(m.members) == 3 for m in matches)


def test_axis_prior_refuses_pairings_no_pedicle_screw_can_have():
    """With the prior (anterior within 70 degrees, either way round), a screw-like object lying
    left-right is not paired, while the pedicle screws beside it are; without it, it is."""
    views = [geometry.ap_view(isocenter_mm=ISO, width=256, height=256, pixel_mm=1.2),
             geometry.lateral_view(isocenter_mm=ISO, width=256, height=256, pixel_mm=1.2)]
    screws = [make([-22, -40, 0], [np.sin(0.25), 1.0, 0.05], sid="L"),
              make([22, -40, 0], [-np.sin(0.25), 1.0, 0.05], sid="R"),
              make([-25, -20, 40], [1.0, 0.1, 0.05], L=40.0, sid="across")]
    _pv, free, _un = run(views, screws)
    assert_each_screw_found_once(free, screws)
    per_view, matches, unmatched = run(views, screws, axis_prior=((0.0, 1.0, 0.0), 70.0))
    assert_each_screw_found_once(matches, screws[:2])
    across = geometry.project(views[0].P, head_centre(screws[2]))
    assert any(u.view_index == 0 and np.linalg.norm(per_view[0][u.instance_index].head_end_px - across) < 5
               for u in unmatched)
    # Posterior-pointing axes (a head end read at the wrong end) still count as on the prior.
    _pv, flipped, _un = run(views, screws[:2], axis_prior=((0.0, -1.0, 0.0), 70.0))
    assert_each_screw_found_once(flipped, screws[:2])
