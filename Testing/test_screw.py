"""Screw model: spec, pose, closed mesh, attenuation volume, truth round trip."""
import numpy as np
import pytest
import vtk

from PedicleScrewPoseLib import screw as S


def _mesh_checks(mesh):
    fe = vtk.vtkFeatureEdges()
    fe.SetInputData(mesh)
    fe.BoundaryEdgesOn()
    fe.NonManifoldEdgesOn()
    fe.FeatureEdgesOff()
    fe.ManifoldEdgesOff()
    fe.Update()
    mp = vtk.vtkMassProperties()
    mp.SetInputData(mesh)
    mp.Update()
    return fe.GetOutput().GetNumberOfCells(), mp.GetVolume()


@pytest.mark.parametrize("d,L", [(4.0, 25.0), (6.5, 45.0)])
def test_mesh_closed_and_volume_matches(d, L):
    spec = S.ScrewSpec.from_size(d, L)
    mesh = S.screw_mesh(spec)
    assert mesh.GetNumberOfPolys() > 10000
    assert mesh.GetNumberOfLines() == 0 and mesh.GetNumberOfVerts() == 0
    assert all(mesh.GetCellType(i) == vtk.VTK_TRIANGLE for i in range(0, mesh.GetNumberOfCells(), 97))
    open_edges, mesh_vol = _mesh_checks(mesh)
    assert open_edges == 0  # closed and manifold
    b = mesh.GetBounds()
    assert b[4] == pytest.approx(-spec.head_height_mm, abs=0.3)
    assert b[5] == pytest.approx(spec.length_mm, abs=0.3)
    assert max(abs(b[0]), b[1]) == pytest.approx(spec.head_radius_mm, abs=0.3)

    # Shaft part: clip the closed mesh at z = 0 and compare with the analytic thread volume.
    plane = vtk.vtkPlane()
    plane.SetOrigin(0, 0, 0)
    plane.SetNormal(0, 0, 1)  # vtkClipClosedSurface keeps the side the normal points to: z >= 0
    planes = vtk.vtkPlaneCollection()
    planes.AddItem(plane)
    clip = vtk.vtkClipClosedSurface()
    clip.SetInputData(mesh)
    clip.SetClippingPlanes(planes)
    tri = vtk.vtkTriangleFilter()
    tri.SetInputConnection(clip.GetOutputPort())
    tri.Update()
    shaft_edges, shaft_vol = _mesh_checks(tri.GetOutput())
    assert shaft_edges == 0
    assert shaft_vol == pytest.approx(S.shaft_volume_mm3(spec), rel=0.02)
    # Sanity of the analytic value: between the core and the outer cylinder.
    assert np.pi * spec.core_radius_mm**2 * (L - spec.tip_length_mm) < S.shaft_volume_mm3(spec)
    assert S.shaft_volume_mm3(spec) < np.pi * spec.outer_radius_mm**2 * L

    # Whole screw: the attenuation volume's titanium equals the mesh's volume.
    vol = S.attenuation_volume(spec)
    head_v, shaft_v = vol.volume_mm3()
    assert head_v + shaft_v == pytest.approx(mesh_vol, rel=0.02)
    assert shaft_v == pytest.approx(S.shaft_volume_mm3(spec), rel=0.01)


def test_attenuation_volume_split_and_grid():
    spec = S.ScrewSpec.from_size(6.5, 45.0)
    vol = S.attenuation_volume(spec, voxel_mm=0.25)
    assert vol.head.dtype == np.float32 and vol.shaft.shape == vol.head.shape
    assert 0 <= vol.total.min() and vol.total.max() <= 1.0 + 1e-6
    z = vol.origin_mm[2] + vol.voxel_mm * np.arange(vol.shape[0])
    assert np.all(vol.head[z >= 0] == 0) and np.all(vol.shaft[z < 0] == 0)
    assert vol.head[z < 0].sum() > 0 and vol.shaft[z >= 0].sum() > 0
    # Grid is centred on the axis: the axis voxel column is full along the shaft core.
    x = vol.origin_mm[0] + vol.voxel_mm * np.arange(vol.shape[2])
    i0 = np.argmin(np.abs(x - 0.125))
    mid = (z > 5) & (z < 40)
    assert np.all(vol.shaft[mid, i0, i0] == 1.0)
    # Cached (same object) and read-only.
    assert S.attenuation_volume(spec, voxel_mm=0.25) is vol
    with pytest.raises(ValueError):
        vol.head[0, 0, 0] = 1.0
    # Agrees with the point-wise occupancy at voxel centres far from the surface.
    k, j, i = np.nonzero(vol.total == 1.0)
    pts = vol.origin_mm + vol.voxel_mm * np.stack([i, j, k], axis=1)
    assert np.all(S.inside(spec, pts[::50]))


def test_signed_distance_basics():
    spec = S.ScrewSpec.from_size(6.0, 40.0)
    pts = np.array([[0, 0, 20.0], [spec.outer_radius_mm + 0.5, 0, 20], [0, 0, 41.0], [0, 0, -spec.head_height_mm - 1],
                    [spec.core_radius_mm - 0.2, 0, 10.0], [0, 0, 0.0]])
    ins = S.inside(spec, pts)
    assert ins.tolist() == [True, False, False, False, True, True]
    # Threads reach the outer radius somewhere on each turn, never beyond.
    a = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    ring = np.stack([(spec.outer_radius_mm - 0.05) * np.cos(a), (spec.outer_radius_mm - 0.05) * np.sin(a),
                     np.full_like(a, 20.0)], axis=1)
    assert S.inside(spec, ring).any() and not S.inside(spec, ring * [1.03, 1.03, 1]).any()


def test_pose_round_trip_and_screw_properties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        entry = rng.normal(0, 100, 3)
        tip = entry + rng.normal(0, 1, 3) * 30
        roll = rng.uniform(-180, 180)
        T = S.pose_from_entry_tip(entry, tip, roll)
        R = T[:3, :3]
        assert np.allclose(R.T @ R, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        L = np.linalg.norm(tip - entry)
        spec = S.ScrewSpec.from_size(6.5, L)
        s = S.Screw(spec, T, id="X")
        assert np.allclose(s.entry_mm, entry) and np.allclose(s.tip_mm, tip, atol=1e-9)
        assert np.allclose(s.to_screw(s.to_world([[1, 2, 3]])), [[1, 2, 3]])
        # roll turns x about z
        T0 = S.pose_from_entry_tip(entry, tip, 0.0)
        c = np.clip(T0[:3, 0] @ T[:3, 0], -1, 1)
        assert np.degrees(np.arccos(c)) == pytest.approx(abs((roll + 180) % 360 - 180), abs=1e-6)
    with pytest.raises(ValueError, match="must differ"):
        S.pose_from_entry_tip([1, 2, 3], [1, 2, 3])


def test_truth_dict_round_trip_and_catalogue():
    spec = S.ScrewSpec.from_size(5.5, 40.0)
    s = S.Screw(spec, S.pose_from_entry_tip([1, 2, 3], [1, 42, 3], 30.0), id="L1-L", level="L1", side="left",
                breach_mm=0.0)
    d = s.to_truth_dict()
    for key in ("id", "entry_mm", "tip_mm", "diameter_mm", "length_mm", "level", "side", "breach_mm"):
        assert key in d
    assert d["tip_mm"] == pytest.approx([1, 42, 3])
    s2 = S.Screw.from_truth_dict(d)
    assert s2.spec == spec and np.allclose(s2.T_world_from_screw, s.T_world_from_screw) and s2.side == "left"
    cat = S.catalogue()
    ds = sorted({c.diameter_mm for c in cat})
    ls = sorted({c.length_mm for c in cat})
    assert ds[0] == 4.0 and ds[-1] == 8.5 and ls[0] == 25.0 and ls[-1] == 60.0
    assert all(c.core_diameter_mm < c.diameter_mm < c.head_diameter_mm for c in cat)
    with pytest.raises(ValueError, match="core_diameter_mm"):
        S.ScrewSpec(6.0, 40.0, 7.0, 2.5, 3.0, 12.0, 14.0)


def test_save_stl(tmp_path):
    spec = S.ScrewSpec.from_size(4.5, 30.0)
    p = S.save_stl(spec, tmp_path / "s.stl", voxel_mm=0.3)
    r = vtk.vtkSTLReader()
    r.SetFileName(str(p))
    r.Update()
    assert r.GetOutput().GetNumberOfPolys() > 1000
    assert list(tmp_path.iterdir()) == [tmp_path / "s.stl"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        S.save_stl(spec, tmp_path / "nowhere" / "s.stl")
