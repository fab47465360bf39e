"""The offscreen 3D picture: bone surface and screws really drawn (VTK offscreen, no display)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from PedicleScrewPoseLib import ct as ctmod
from PedicleScrewPoseLib import render3d, screw


def _volumes():
    """A 2 mm CT with two bone blocks ('T12' above 'L1') centred on the origin, and its labels."""
    hu = np.full((30, 36, 40), -1000.0, np.float32)
    lab = np.zeros(hu.shape, np.int16)
    hu[3:14, 6:30, 8:32] = 600
    hu[16:27, 6:30, 8:32] = 600
    lab[3:14, 6:30, 8:32] = 31
    lab[16:27, 6:30, 8:32] = 32
    M = np.diag([2.0, 2.0, 2.0, 1.0])
    M[:3, 3] = [-39.0, -35.0, -29.0]
    return ctmod.Volume(hu, M), ctmod.LabelVolume(lab, M.copy(), names={31: "L1", 32: "T12"})


def _screws(color):
    out = []
    for sx in (-1.0, 1.0):
        entry = np.array([sx * 20.0, -45.0, 10.0])
        tip = entry + 40.0 * np.array([-sx * 0.3, 0.95, 0.0]) / np.linalg.norm([0.3, 0.95, 0.0])
        out.append(((6.5, 40.0), screw.pose_from_entry_tip(entry, tip), color, "T12 " + "LR"[sx > 0]))
    return out


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _red(px):
    return int(((px[..., 0] > 150) & (px[..., 1] < 90) & (px[..., 2] < 90)).sum())


def _bone(px):
    # ivory / tan bone over a white background: warm, not white
    return int(((px[..., 0] - px[..., 2] > 25) & (px[..., 1] > 90) & (px[..., 0] < 250)).sum())


def test_bone_and_screws_are_drawn_offscreen(tmp_path):
    ct, labels = _volumes()
    out = render3d.render_scene_png(tmp_path / "scene.png", ct=ct, labels=labels, screws=_screws((1.0, 0.0, 0.0)),
                                    size=(240, 180), title="test")
    assert out.renderer == "vtk" and out.n_screws == 2 and out.bone_triangles > 100
    px = _pixels(out.path)
    assert px.shape == (180, 240, 3)
    assert _red(px) > 200 and _bone(px) > 500
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_ct_threshold_is_used_without_labels_and_nothing_red_without_screws(tmp_path):
    ct, _ = _volumes()
    out = render3d.render_scene_png(tmp_path / "ct.png", ct=ct, size=(200, 150), camera="lateral")
    px = _pixels(out.path)
    assert out.bone_triangles > 100 and _bone(px) > 300 and _red(px) == 0


def test_screws_from_result_colours_by_grade_and_bad_input_is_refused(tmp_path):
    T = screw.pose_from_entry_tip([0, 0, 0], [0, 40, 0])
    items = render3d.screws_from_result({"screws": [
        {"id": "S1", "diameter_mm": 6.5, "length_mm": 40.0, "transform": T.tolist(), "level": "L1", "side": "left",
         "breach": {"grade": "D", "max_mm": 3.0}}]})
    assert items[0]["color"] == render3d.GRADE_COLORS["D"] and items[0]["text"] == "L1 L"
    with pytest.raises(ValueError, match="camera"):
        render3d.render_scene_png(tmp_path / "x.png", screws=items, camera="above")
    with pytest.raises(ValueError, match="4x4"):
        render3d.render_scene_png(tmp_path / "x.png", screws=[((6.5, 40.0), np.eye(3), (1, 0, 0))])
    assert not (tmp_path / "x.png").exists()
