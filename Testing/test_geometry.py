"""Geometry round trips and identities (property tests)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from PedicleScrewPoseLib import geometry as g

angles = st.floats(-60, 60)
views = st.builds(
    lambda lao, cran, sid, sdd, pix, off_u, off_v, roll: g.carm_view(
        lao_deg=lao, cranial_deg=cran, sid_mm=sid, sdd_mm=sdd, pixel_mm=pix,
        principal_offset_px=(off_u, off_v), detector_roll_deg=roll, isocenter_mm=(10, -20, 30)),
    st.floats(-90, 90), angles, st.floats(450, 800), st.floats(900, 1300), st.floats(0.2, 1.0),
    st.floats(-40, 40), st.floats(-40, 40), st.floats(-10, 10),
)
points = st.lists(st.tuples(st.floats(-80, 80), st.floats(-80, 80), st.floats(-80, 80)), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(views, st.floats(0.01, 1e3))
def test_decompose_compose_round_trip(view, scale):
    K, R, t = g.decompose_projection(view.P * scale)
    np.testing.assert_allclose(K, view.K, rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(R, view.R, atol=1e-9)
    np.testing.assert_allclose(t, view.t, rtol=1e-7, atol=1e-6)
    assert np.isclose(np.linalg.det(R), 1.0)
    np.testing.assert_allclose(g.compose_projection(K, R, t), view.P, rtol=1e-9, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(views, points)
def test_project_backproject_round_trip(view, pts):
    X = np.asarray(pts, float)
    uv = view.project(X)
    src, d = view.backproject(uv)
    np.testing.assert_allclose(src, view.source_mm, atol=1e-6)
    # every point lies on its pixel's ray, in front of the source
    s = np.einsum("ij,ij->i", X - src, d)
    assert np.all(s > 0)
    np.testing.assert_allclose(src + s[:, None] * d, X, atol=1e-6)
    assert np.all(g.depth(view.P, X) > 0)


@settings(max_examples=40, deadline=None)
@given(views, views, points)
def test_epipolar_constraint_and_triangulation(v1, v2, pts):
    X = np.asarray(pts, float)
    if np.linalg.norm(v1.source_mm - v2.source_mm) < 50:
        return  # same source: no baseline
    uv1, uv2 = v1.project(X), v2.project(X)
    lines = g.epipolar_line(v1.P, v2.P, uv1)
    dist = np.abs(np.einsum("ij,ij->i", lines, np.hstack([uv2, np.ones((len(uv2), 1))])))
    assert np.all(dist < 1e-4 * max(v2.width, 1) + 1e-3)
    for x, a, b in zip(X, uv1, uv2):
        np.testing.assert_allclose(g.triangulate_points([v1.P, v2.P], [a, b]), x, atol=1e-4)


def test_ap_and_lateral_geometry():
    ap, lat = g.ap_view(isocenter_mm=(0, 0, 0)), g.lateral_view(isocenter_mm=(0, 0, 0))
    np.testing.assert_allclose(ap.source_mm, [0, -600, 0], atol=1e-9)  # posterior source
    np.testing.assert_allclose(lat.source_mm, [600, 0, 0], atol=1e-9)  # source on the patient's right
    # superior points appear higher in the image (smaller v)
    assert ap.project([0, 0, 50])[1] < ap.project([0, 0, 0])[1]
    assert lat.project([0, 0, 50])[1] < lat.project([0, 0, 0])[1]
    np.testing.assert_allclose(ap.project([0, 0, 0]), [255.5, 255.5])


def test_triangulate_line_from_three_views():
    vs = [g.carm_view(lao_deg=a, cranial_deg=c) for a, c in ((0, 0), (90, 0), (30, 15))]
    a, b = np.array([10.0, -5, 20]), np.array([-15.0, 30, -10])
    lines = [g.line_through_points_2d(*v.project(np.stack([a, b]))) for v in vs]
    p, d = g.triangulate_line([v.P for v in vs], lines)
    true_d = (b - a) / np.linalg.norm(b - a)
    assert abs(abs(d @ true_d) - 1) < 1e-9
    off = (a - p) - ((a - p) @ d) * d
    assert np.linalg.norm(off) < 1e-6


def test_mirrored_detector_decomposes():
    P = g.ap_view().P.copy()
    P[0] = -P[0] + 511 * P[2]  # u -> 511 - u
    K, R, t = g.decompose_projection(P)
    assert K[0, 0] < 0 and np.isclose(np.linalg.det(R), 1)
    np.testing.assert_allclose(g.compose_projection(K, R, t), P, atol=1e-6)


@pytest.mark.parametrize("P, msg", [
    (np.zeros((3, 4)), "singular"),
    (np.ones((3, 3)), "3x4"),
    (np.full((3, 4), np.nan), "NaN"),
])
def test_bad_projection_matrices(P, msg):
    with pytest.raises(ValueError, match=msg):
        g.decompose_projection(P)


def test_parallel_planes_are_refused():
    v = g.ap_view()
    l = g.line_through_points_2d([10, 10], [100, 200])
    with pytest.raises(ValueError, match="parallel"):
        g.triangulate_line([v.P, v.P], [l, l])


def test_point_segment_distance_in_2d_and_3d():
    d = g.point_segment_distance([[0, 1], [-3, 4], [12, 0], [5, 0]], [0, 0], [10, 0])
    np.testing.assert_allclose(d, [1.0, 5.0, 2.0, 0.0])
    d3 = g.point_segment_distance([[1, 2, 5]], [0, 0, 0], [0, 0, 10])
    np.testing.assert_allclose(d3, [np.sqrt(5.0)])
    # A segment of zero length is a point.
    np.testing.assert_allclose(g.point_segment_distance([[3, 4]], [0, 0], [0, 0]), [5.0])
