"""CT input: RAS geometry from ITK files, label names, HU -> materials, mass attenuation."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from PedicleScrewPoseLib import ct as C


def _oblique_image():
    a = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # [k, j, i]
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((0.5, 0.8, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    D = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])  # LPS direction, columns = axes of i, j, k
    img.SetDirection(D.ravel().tolist())
    return a, img


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha"])
def test_load_volume_ras_geometry_and_round_trip(tmp_path, ext):
    a, img = _oblique_image()
    path = tmp_path / f"v{ext}"
    sitk.WriteImage(img, str(path))
    vol = C.load_volume(path)
    assert vol.array.shape == (4, 5, 6) and np.array_equal(vol.array, a)
    # ITK's own physical point (LPS) of voxel (i, j, k) = (3, 2, 1), flipped to RAS.
    lps = np.array(img.TransformIndexToPhysicalPoint((3, 2, 1)))
    ras = np.array([-lps[0], -lps[1], lps[2]])
    assert np.allclose(vol.ijk_to_ras @ [3, 2, 1, 1], [*ras, 1], atol=1e-4)
    assert np.allclose(vol.ras_to_ijk_points(ras), [[3, 2, 1]], atol=1e-4)
    assert np.allclose(vol.spacing_mm, [0.5, 0.8, 2.0])
    assert vol.sample(ras[None], order=0)[0] == a[1, 2, 3]
    # Round trip through save_volume keeps values and geometry.
    out = tmp_path / f"w{ext}"
    C.save_volume(vol, out)
    back = C.load_volume(out)
    assert np.array_equal(back.array, a)
    assert np.allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == sorted([f"v{ext}", f"w{ext}"])  # no temp files left


def test_dicom_series_folder(tmp_path):
    a = (np.arange(3 * 8 * 9).reshape(3, 8, 9) % 200).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(3):
        sl = sitk.GetImageFromArray(a[k])
        sl.SetSpacing((0.7, 0.7))
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # series instance uid
        sl.SetMetaData("0020|0032", f"-5\\-7\\{2.5 * k}")  # image position (patient), LPS
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0018|0050", "2.5")
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(tmp_path / f"s{k}.dcm"))
        writer.Execute(sl)
    vol = C.load_volume(tmp_path)
    assert vol.array.shape == (3, 8, 9)
    assert np.array_equal(vol.array, a)
    assert np.allclose(vol.ijk_to_ras @ [0, 0, 0, 1], [5, 7, 0, 1], atol=1e-3)
    assert np.allclose(vol.ijk_to_ras @ [1, 1, 2, 1], [5 - 0.7, 7 - 0.7, 5.0, 1], atol=1e-3)


def test_bad_paths_and_files(tmp_path):
    missing = tmp_path / "nothere.nii.gz"
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        C.load_volume(missing)
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        C.load_labels(missing)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="junk.nrrd"):
        C.load_volume(junk)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        C.load_volume(empty)
    f = sitk.GetImageFromArray(np.full((2, 2, 2), 0.5, np.float32))
    sitk.WriteImage(f, str(tmp_path / "frac.nii.gz"))
    with pytest.raises(ValueError, match="integer"):
        C.load_labels(tmp_path / "frac.nii.gz")


def test_example_ct_names_and_geometry():
    ct, labels = C.example_ct()
    assert ct.array.shape == labels.array.shape == (133, 512, 512)
    assert np.allclose(ct.spacing_mm, [0.703125, 0.703125, 2.5])
    for name, value in {"T10": 34, "T11": 33, "T12": 32, "L1": 31, "L2": 30, "L3": 29, "T1": 43}.items():
        assert labels.names[value] == name and labels.value_of(name) == value
    assert labels.names[5] == "liver"
    # RAS sanity: the liver lies on the patient's right (+x) of the spine; the spine is posterior of the liver.
    def centroid(v):
        k, j, i = np.nonzero(labels.array[::2, ::4, ::4] == v)
        return labels.ijk_to_ras_points(np.c_[i * 4, j * 4, k * 2]).mean(axis=0)
    liver, t12, l3 = centroid(5), centroid(32), centroid(29)
    assert liver[0] > t12[0] + 30
    assert t12[1] < liver[1]
    assert l3[2] < t12[2] - 60  # L3 below T12 (superior is +z)
    assert float(ct.array.min()) >= -2048 and float(ct.array.max()) > 1000  # -2048 pads outside the field of view
    with pytest.raises(ValueError):
        ct.array[0, 0, 0] = 0  # cached arrays are read-only


def test_material_densities_model():
    hu = np.array([-1024, -950, -500, 0, 100, 800, 1500, 2500], dtype=np.float32)
    d = C.material_densities(hu)
    assert d["soft"].dtype == np.float32 and d["soft"].shape == hu.shape
    assert d["soft"][0] == 0 and d["bone"][0] == 0
    assert d["soft"][2] == pytest.approx(0.5) and d["soft"][3] == pytest.approx(1.0)
    assert d["bone"][3] == 0 and d["bone"][5] > 0.5 and d["bone"][6] == pytest.approx(1.92)
    # Continuous in HU: no jump at the model's breakpoints.
    h = np.linspace(-1000, 3000, 40001, dtype=np.float32)
    dd = C.material_densities(h)
    jumps = [np.abs(np.diff(dd[m][h > -899])).max() for m in ("soft", "bone")]
    assert max(jumps) < 1e-2
    vols = C.material_volumes(C.Volume(hu.reshape(2, 2, 2), np.eye(4)))
    assert np.allclose(vols["bone"].array.ravel(), d["bone"])


def test_mass_attenuation_nist_values():
    e = np.array([30.0, 60.0, 100.0])
    # NIST XCOM / Hubbell-Seltzer total with coherent, cm^2/g (ICRU-44 tissues; water-like soft tissue).
    assert C.mass_attenuation_cm2_g("soft", 60.0) == pytest.approx(0.2048, rel=0.03)
    assert C.mass_attenuation_cm2_g("bone", 60.0) == pytest.approx(0.3148, rel=0.03)
    ti = C.mass_attenuation_cm2_g("titanium", e)
    assert ti.shape == (3,) and np.all(np.diff(ti) < 0)
    assert C.mass_attenuation_cm2_g("steel", e)[1] > ti[1] > C.mass_attenuation_cm2_g("bone", 60.0)
    assert C.mass_attenuation_cm2_g("air", [[60.0]]).shape == (1, 1)
    assert set(C.DENSITY_G_CM3) >= {"soft", "bone", "titanium", "steel", "air"}
    assert C.DENSITY_G_CM3["titanium"] == pytest.approx(4.43)
    with pytest.raises(ValueError, match="unknown material"):
        C.mass_attenuation_cm2_g("gold", 60.0)
