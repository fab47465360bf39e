"""Case / truth / result files: round trips and every kind of bad input."""
import json
import os

import numpy as np
import pytest

from PedicleScrewPoseLib import geometry as g
from PedicleScrewPoseLib import io


def _views():
    return [g.ap_view(width=64, height=48, pixel_mm=4.0), g.lateral_view(width=64, height=48, pixel_mm=4.0)]


def _images(dtype=np.uint16):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 1000, (48, 64)).astype(dtype) for _ in range(2)]


@pytest.fixture
def case_dir(tmp_path):
    return io.write_case(tmp_path / "case", _views(), _images(), implants=[{"diameter_mm": 6.5, "length_mm": 45}])


def _edit(case_dir, fn):
    p = case_dir / "case.json"
    doc = json.loads(p.read_text(encoding="utf-8"))
    fn(doc)
    p.write_text(json.dumps(doc))


def test_round_trip(case_dir):
    case = io.read_case(case_dir)
    assert case.view_names() == ["AP", "LAT"]
    for v, v0, im, im0 in zip(case.views, _views(), case.images, _images()):
        np.testing.assert_allclose(v.P / v.P[2, 3], v0.P / v0.P[2, 3], rtol=1e-9, atol=1e-12)
        assert (v.width, v.height) == (64, 48)
        np.testing.assert_array_equal(im, im0.astype(np.float32))
    assert case.implants == [{"diameter_mm": 6.5, "length_mm": 45.0}]


def test_refuses_to_overwrite(case_dir):
    with pytest.raises(FileExistsError):
        io.write_case(case_dir, _views(), _images())


@pytest.mark.parametrize("suffix", [".png", ".tif", ".nrrd", ".nii.gz", ".mha"])
def test_image_formats(tmp_path, suffix):
    a = (np.arange(48 * 64).reshape(48, 64) % 4000).astype(np.uint16)
    p = io.write_image(tmp_path / f"x{suffix}", a)
    np.testing.assert_array_equal(io.read_image(p), a.astype(np.float32))


def test_dicom_16bit_monochrome1(tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.2"  # X-ray RF
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "RF"
    a = (np.arange(48 * 64).reshape(48, 64) * 7 % 4000).astype(np.uint16)
    ds.Rows, ds.Columns = a.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = a.tobytes()
    ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
    img = io.read_image(tmp_path / "x.dcm")
    np.testing.assert_array_equal(img, a.max() - a.astype(np.float32))  # inverted to MONOCHROME2


@pytest.mark.parametrize("edit, exc, msg", [
    (lambda d: d["views"][0].__setitem__("image", "missing.png"), FileNotFoundError, "missing.png"),
    (lambda d: d["views"][0].__setitem__("projection_matrix", [[1, 2, 3]]), ValueError, "3x4"),
    (lambda d: d["views"][0].__setitem__("projection_matrix", np.zeros((3, 4)).tolist()), ValueError, "singular"),
    (lambda d: d["views"][0]["projection_matrix"][1].__setitem__(2, None), ValueError, "NaN"),
    (lambda d: d["views"][1].__setitem__("projection_matrix", (-np.asarray(d["views"][1]["projection_matrix"])).tolist()), ValueError, "behind"),
    (lambda d: d["views"][0].__setitem__("image", "../outside.png"), ValueError, "outside the case folder"),
    (lambda d: d["views"][0].__setitem__("image", "/etc/passwd"), ValueError, "relative"),
    (lambda d: d.__setitem__("views", d["views"][:1]), ValueError, "at least two"),
    (lambda d: d["views"][1].__setitem__("name", "AP"), ValueError, "twice"),
    (lambda d: d["views"][0].__setitem__("metal", "grey"), ValueError, "metal"),
    (lambda d: d.__setitem__("screws", [{"diameter_mm": -1, "length_mm": 40}]), ValueError, "diameter_mm"),
    (lambda d: d.__setitem__("format", "something/2"), ValueError, "format"),
])
def test_bad_case_files(case_dir, edit, exc, msg):
    _edit(case_dir, edit)
    with pytest.raises(exc, match=msg) as info:
        io.read_case(case_dir)
    if exc is ValueError:
        assert "case.json" in str(info.value)


def test_principal_point_disagreeing_with_image_size(case_dir):
    big = g.ap_view(width=2048, height=2048, pixel_mm=1.0)
    _edit(case_dir, lambda d: d["views"][0].__setitem__("projection_matrix", big.P.tolist()))
    with pytest.raises(ValueError, match="principal point"):
        io.read_case(case_dir)


def test_bad_json_and_missing_folder(tmp_path, case_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.read_case(tmp_path / "nope")
    (case_dir / "case.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"case.json is not valid JSON"):
        io.read_case(case_dir)


def test_bad_images(tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "x.jpg2").write_bytes(b"abc")
        io.read_image(tmp_path / "x.jpg2")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    with pytest.raises(ValueError, match="corrupt.png"):
        io.read_image(tmp_path / "corrupt.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        io.read_image(tmp_path / "empty.png")
    nan = np.full((8, 8), np.nan, np.float32)
    io.write_image(tmp_path / "nan.nrrd", nan)
    with pytest.raises(ValueError, match="NaN"):
        io.read_image(tmp_path / "nan.nrrd")
    vol = np.zeros((3, 8, 8), np.float32)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "vol.mha"))
    with pytest.raises(ValueError, match="3 slices"):
        io.read_image(tmp_path / "vol.mha")


def test_absurd_image_refused_before_decoding(tmp_path, monkeypatch):
    # A real PNG whose header claims more pixels than we accept: refused on the header.
    monkeypatch.setattr(io, "MAX_IMAGE_PIXELS", 100)
    io.write_image(tmp_path / "big.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(ValueError, match="too large"):
        io.read_image(tmp_path / "big.png")


def test_rgb_screen_grab_becomes_grey(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 1] = 200
    io.write_image(tmp_path / "grab.png", rgb)
    img = io.read_image(tmp_path / "grab.png")
    assert img.shape == (10, 12) and 100 < img.mean() < 200


def test_safe_view_filename_cannot_escape():
    for name in ["../../etc/passwd", "/abs", "a/b", "..", "AP 1", "lat\x00x", "ü"]:
        s = io.safe_view_filename(name)
        assert "/" not in s and s not in ("", ".", "..") and "\x00" not in s


def test_truth_and_result_round_trip(case_dir, tmp_path):
    screw = {"id": "T12-L", "entry_mm": [1, 2, 3], "tip_mm": [4, 5, 6], "diameter_mm": 6.5, "length_mm": 45}
    io.write_truth(case_dir, [screw], {"AP": np.zeros((48, 64), np.uint8), "../LAT": np.ones((48, 64), np.uint8)})
    assert io.read_truth(case_dir)["screws"][0]["id"] == "T12-L"
    assert sorted(p.name for p in (case_dir / "truth").iterdir()) == ["AP_labels.png", "LAT_labels.png", "truth.json"]
    np.testing.assert_array_equal(io.read_truth_labels(case_dir, "../LAT"), 1)
    io.write_result(tmp_path / "out", {"screws": [screw], "unmatched": []})
    assert io.read_result(tmp_path / "out")["format"] == io.RESULT_FORMAT
    with pytest.raises(ValueError, match="NaN|Out of range"):
        io.write_result(tmp_path / "out2", {"screws": [{"entry_mm": [float("nan")] * 3}]})
    assert not (tmp_path / "out2" / "result.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"screws": [{"entry_mm": [1, 2], "tip_mm": [1, 2, 3]}]}))
    with pytest.raises(ValueError, match="entry_mm"):
        io.read_result(bad)


def test_output_dir_must_be_outside_case(case_dir):
    with pytest.raises(ValueError, match="must not be inside"):
        io.ensure_output_dir_outside(case_dir / "out", case_dir)
    io.ensure_output_dir_outside(case_dir.parent / "out", case_dir)
