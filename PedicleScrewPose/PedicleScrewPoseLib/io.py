"""Case, truth and result files (``../shared/CASE_FORMAT.md``) and X-ray image I/O.

Everything read here comes from an untrusted case folder: every path must stay
inside the folder, every image's header is checked before its pixels are
decoded, and every error names the file and the field.  Everything written goes
through a temporary file (or folder) and an atomic rename, so a failure never
leaves half a file behind and inputs are never overwritten.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import geometry

CASE_FORMAT = "pedicle-screw-case/1"
TRUTH_FORMAT = "pedicle-screw-truth/1"
RESULT_FORMAT = "pedicle-screw-result/1"

#: Images above this many pixels are refused before decoding (a C-arm image is ~1-4 Mpx).
MAX_IMAGE_PIXELS = 8192 * 8192
#: Files above this size are refused before reading.
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
IMAGE_SUFFIXES = PNG_SUFFIXES + TIFF_SUFFIXES + ITK_SUFFIXES + (".dcm", ".dicom")


@dataclass
class Case:
    """A case folder read and validated.

    ``views[i]`` (geometry.View, with ``name``, ``width``, ``height``, ``metal``)
    belongs to ``images[i]`` (float32 ``[v, u]`` as stored: polarity not yet decided).
    """

    root: Path
    views: list
    images: list
    implants: list = field(default_factory=list)
    ct_path: Path | None = None
    labels_path: Path | None = None
    label_names: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    image_paths: list = field(default_factory=list)

    def view_names(self) -> list[str]:
        return [v.name for v in self.views]


# ----------------------------------------------------------------------------- case

def read_case(case_dir, *, load_images: bool = True) -> Case:
    """Read and validate ``case_dir/case.json`` and its view images."""
    root = Path(case_dir)
    if not root.exists():
        raise FileNotFoundError(f"case folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder (expected a case folder with case.json)")
    manifest = root / "case.json"
    raw = read_json(manifest)
    where = str(manifest)
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: top level must be a JSON object")
    fmt = raw.get("format", CASE_FORMAT)
    if not isinstance(fmt, str) or not fmt.startswith("pedicle-screw-case/"):
        raise ValueError(f"{where}: 'format' is {fmt!r}, expected {CASE_FORMAT!r}")
    if fmt != CASE_FORMAT:
        raise ValueError(f"{where}: unsupported format version {fmt!r}; this reader knows {CASE_FORMAT!r}")
    views_raw = raw.get("views")
    if not isinstance(views_raw, list) or len(views_raw) < 2:
        raise ValueError(f"{where}: 'views' must be a list of at least two views")

    views, images, paths = [], [], []
    seen = set()
    for i, vr in enumerate(views_raw):
        key = f"{where}: views[{i}]"
        if not isinstance(vr, dict):
            raise ValueError(f"{key} must be an object")
        name = vr.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{key}: 'name' must be a non-empty string")
        if name in seen:
            raise ValueError(f"{key}: view name {name!r} is used twice")
        seen.add(name)
        key = f"{where}: view {name!r}"
        metal = vr.get("metal")
        if metal is not None and metal not in ("bright", "dark"):
            raise ValueError(f"{key}: 'metal' is {metal!r}, expected 'bright' or 'dark'")
        P = parse_projection_matrix(vr.get("projection_matrix"), key)
        image_path = resolve_inside(root, vr.get("image"), f"{key}: 'image'")
        if not image_path.exists():
            raise FileNotFoundError(f"{key}: image file {image_path} does not exist")
        if load_images:
            image = read_image(image_path)
            height, width = image.shape
        else:
            image = None
            width, height = image_size(image_path)
        try:
            view = geometry.View.from_P(P, width, height, name=name, metal=metal)
        except ValueError as exc:
            raise ValueError(f"{key}: 'projection_matrix' {exc}") from None
        check_principal_point(view, f"{key}: 'projection_matrix'", image_path)
        views.append(view)
        images.append(image)
        paths.append(image_path)

    implants = _parse_implants(raw.get("screws"), where)
    ct_path = resolve_inside(root, raw["ct"], f"{where}: 'ct'") if raw.get("ct") else None
    labels_path = resolve_inside(root, raw["labels"], f"{where}: 'labels'") if raw.get("labels") else None
    for p, what in ((ct_path, "ct"), (labels_path, "labels")):
        if p is not None and not p.exists():
            raise FileNotFoundError(f"{where}: '{what}' file {p} does not exist")
    label_names = raw.get("label_names") or {}
    if not isinstance(label_names, dict) or not all(isinstance(v, str) for v in label_names.values()):
        raise ValueError(f"{where}: 'label_names' must map label values to names")
    try:
        label_names = {int(k): v for k, v in label_names.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'label_names' keys must be integer label values") from None
    check_views_face_scene(views, where)
    return Case(root=root, views=views, images=images, implants=implants, ct_path=ct_path,
                labels_path=labels_path, label_names=label_names, raw=raw, image_paths=paths)


def parse_projection_matrix(value, where: str) -> np.ndarray:
    """A 3x4 list of finite numbers → float array, with errors that say what is wrong."""
    if value is None:
        raise ValueError(f"{where}: 'projection_matrix' is missing")
    try:
        P = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'projection_matrix' must be 3 rows of 4 numbers") from None
    if P.shape != (3, 4):
        raise ValueError(f"{where}: 'projection_matrix' must be 3x4, got shape {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError(f"{where}: 'projection_matrix' contains NaN or infinite values")
    try:
        geometry.decompose_projection(P)
    except ValueError as exc:
        raise ValueError(f"{where}: 'projection_matrix' {exc}") from None
    return P


def check_principal_point(view, where: str, image_path) -> None:
    """The principal point must lie near the image: far off means P and the image disagree."""
    cu, cv = view.K[0, 2], view.K[1, 2]
    w, h = view.width, view.height
    if not (-0.5 * w <= cu <= 1.5 * w and -0.5 * h <= cv <= 1.5 * h):
        raise ValueError(
            f"{where}: principal point ({cu:.1f}, {cv:.1f}) px is far outside the {w}x{h} image "
            f"{Path(image_path).name}: the matrix does not belong to this image size"
        )


def check_views_face_scene(views, where: str, scene_point_mm=None) -> None:
    """Every view must see the scene in front of its source (w > 0).

    The scene point is the CT's centre when known, else the point closest to all
    central rays (the isocentre of a C-arm).
    """
    if scene_point_mm is None:
        centres, dirs = [], []
        for v in views:
            src, d = geometry.backproject(v.P, [(v.width - 1) / 2.0, (v.height - 1) / 2.0])
            centres.append(src)
            dirs.append(d)
        A = np.zeros((3, 3))
        b = np.zeros(3)
        for c, d in zip(centres, dirs):
            M = np.eye(3) - np.outer(d, d)
            A += M
            b += M @ c
        if np.linalg.cond(A) > 1e8:
            return  # all central rays parallel: no isocentre to check against
        scene_point_mm = np.linalg.solve(A, b)
    for v in views:
        if geometry.depth(v.P, scene_point_mm)[0] <= 0:
            raise ValueError(
                f"{where}: view {v.name!r}: the projection matrix puts the scene behind the X-ray source "
                f"(w <= 0 at {np.round(scene_point_mm, 1).tolist()} mm); check the sign of P"
            )


def _parse_implants(value, where):
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}: 'screws' must be a list of {{diameter_mm, length_mm}}")
    out = []
    for i, s in enumerate(value):
        if not isinstance(s, dict):
            raise ValueError(f"{where}: screws[{i}] must be an object")
        item = dict(s)
        for k in ("diameter_mm", "length_mm"):
            x = s.get(k)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x <= 0:
                raise ValueError(f"{where}: screws[{i}].{k} must be a positive number, got {x!r}")
            item[k] = float(x)
        out.append(item)
    return out


def write_case(case_dir, views, images, *, implants=None, ct=None, labels=None, label_names=None,
               extra=None, image_format: str = "png", overwrite: bool = False) -> Path:
    """Write a case folder atomically: built in a temporary sibling folder, then renamed.

    ``images[i]``: uint8 or uint16 ``[v, u]`` (written as is) or float (written as NRRD/MHA only).
    ``ct``/``labels``: paths of files to copy into the case (kept by name), or None.
    """
    case_dir = Path(case_dir)
    if case_dir.exists() and any(case_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{case_dir} exists and is not empty; refusing to overwrite it")
    case_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case_dir.name}.", dir=case_dir.parent))
    try:
        manifest = {"format": CASE_FORMAT, "views": []}
        used = set()
        for view, image in zip(views, images):
            stem = safe_view_filename(view.name)
            while stem in used:
                stem += "_"
            used.add(stem)
            fname = f"{stem}.{image_format}"
            write_image(tmp / fname, image)
            entry = {"name": view.name, "image": fname,
                     "projection_matrix": np.asarray(view.P, float).tolist()}
            if view.metal:
                entry["metal"] = view.metal
            manifest["views"].append(entry)
        if implants:
            manifest["screws"] = [dict(s) for s in implants]
        for src, key in ((ct, "ct"), (labels, "labels")):
            if src is not None:
                src = Path(src)
                shutil.copyfile(src, tmp / src.name)
                manifest[key] = src.name
        if label_names:
            manifest["label_names"] = {str(k): v for k, v in label_names.items()}
        if extra:
            for k, v in extra.items():
                manifest.setdefault(k, v)
        write_json_atomic(tmp / "case.json", manifest)
        _replace_dir(tmp, case_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return case_dir


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


# ----------------------------------------------------------------------------- truth / result

def write_truth(case_dir, screws, label_maps: dict | None = None, extra: dict | None = None) -> Path:
    """``case_dir/truth/truth.json`` and ``truth/<view name>_labels.png`` (uint8 0/1/2)."""
    truth_dir = Path(case_dir) / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    entries = [s.to_truth_dict() if hasattr(s, "to_truth_dict") else dict(s) for s in screws]
    doc = {"format": TRUTH_FORMAT, "screws": entries}
    if extra:
        doc.update(extra)
    for name, lab in (label_maps or {}).items():
        write_png(truth_dir / f"{safe_view_filename(name)}_labels.png", np.asarray(lab, np.uint8))
    write_json_atomic(truth_dir / "truth.json", doc)
    return truth_dir / "truth.json"


def read_truth(path) -> dict:
    """Read truth.json (given the file, the case folder or its ``truth/`` folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "truth.json" if (p / "truth.json").exists() else p / "truth" / "truth.json"
    doc = read_json(p)
    if not isinstance(doc, dict) or not isinstance(doc.get("screws"), list):
        raise ValueError(f"{p}: expected an object with a 'screws' list ({TRUTH_FORMAT})")
    for i, s in enumerate(doc["screws"]):
        _check_points(s, ("entry_mm", "tip_mm"), f"{p}: screws[{i}]")
    return doc


def read_truth_labels(case_dir, view_name) -> np.ndarray:
    """The simulator's label map of one view (uint8 0/1/2)."""
    p = Path(case_dir) / "truth" / f"{safe_view_filename(view_name)}_labels.png"
    return read_image(p).astype(np.uint8)


def read_result(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    doc = read_json(p)
    if not isinstance(doc, dict) or not isinstance(doc.get("screws"), list):
        raise ValueError(f"{p}: expected an object with a 'screws' list ({RESULT_FORMAT})")
    for i, s in enumerate(doc["screws"]):
        _check_points(s, ("entry_mm", "tip_mm"), f"{p}: screws[{i}]")
    return doc


def write_result(out_dir, result: dict) -> Path:
    doc = {"format": RESULT_FORMAT, **result}
    doc["format"] = RESULT_FORMAT
    path = Path(out_dir) / "result.json"
    write_json_atomic(path, doc)
    return path


def _check_points(entry, keys, where):
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object")
    for k in keys:
        v = entry.get(k)
        try:
            a = np.asarray(v, float)
        except (TypeError, ValueError):
            a = None
        if a is None or a.shape != (3,) or not np.all(np.isfinite(a)):
            raise ValueError(f"{where}.{k} must be 3 finite numbers (RAS mm), got {v!r}")


# ----------------------------------------------------------------------------- json

def read_json(path):
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{p} is {p.stat().st_size} bytes: too large for a JSON manifest")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{p} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def write_json_atomic(path, obj) -> Path:
    """JSON (strict: NaN refused) through a temporary file and an atomic rename."""
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False)
    return write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def write_bytes_atomic(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600: outputs are for everyone who may read the folder
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------- paths

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_view_filename(name: str) -> str:
    """A file-name stem from a free-text view name that cannot leave its folder."""
    stem = _SAFE.sub("_", str(name)).strip("._") or "view"
    return stem[:64]


def resolve_inside(root, rel, where: str) -> Path:
    """``root/rel``, refusing absolute paths and anything that escapes ``root``."""
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"{where} must be a relative file name inside the case folder")
    if "\x00" in rel or os.path.isabs(rel) or re.match(r"^[A-Za-z]:", rel):
        raise ValueError(f"{where}: {rel!r} must be relative to the case folder")
    root_r = Path(root).resolve()
    p = (root_r / rel).resolve()
    if root_r != p and root_r not in p.parents:
        raise ValueError(f"{where}: {rel!r} points outside the case folder {root}")
    return p


def ensure_output_dir_outside(out_dir, case_dir) -> None:
    """Refuse to write results into (or above) the case folder: inputs are never overwritten."""
    o = Path(out_dir).resolve()
    c = Path(case_dir).resolve()
    if o == c or c in o.parents or o in c.parents:
        raise ValueError(f"output folder {out_dir} must not be inside (or contain) the case folder {case_dir}")


# ----------------------------------------------------------------------------- images

def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"image file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"image {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"image file {path} is empty")
    if size > MAX_FILE_BYTES:
        raise ValueError(f"image file {path} is {size / 2**20:.0f} MiB: refusing to read (limit {MAX_FILE_BYTES >> 20} MiB)")


def _check_dims(path, width, height, depth=1):
    if width < 1 or height < 1:
        raise ValueError(f"image {path} has no pixels ({width}x{height})")
    if width * height * max(depth, 1) > MAX_IMAGE_PIXELS:
        raise ValueError(f"image {path} is {width}x{height}x{depth} pixels: too large for an X-ray, refused before decoding")


def image_size(path) -> tuple[int, int]:
    """(width, height) from the header alone."""
    path = Path(path)
    _check_file(path)
    sfx = _suffix(path)
    if sfx in PNG_SUFFIXES + TIFF_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    img = read_image(path)
    return img.shape[1], img.shape[0]


def read_image(path) -> np.ndarray:
    """An X-ray image as float32 ``[v, u]`` with the stored grey values.

    PNG/TIFF (8/16-bit grey; RGB screen grabs are turned to luminance), NRRD,
    NIfTI, MHA (2D, or 3D with one slice), DICOM (rescale applied, MONOCHROME1
    inverted so larger = brighter; overlay planes are not burned in).  The header
    is checked before the pixels are decoded; absurd sizes, corrupt files and
    non-finite pixels are refused with the file named.
    """
    path = Path(path)
    _check_file(path)
    sfx = _suffix(path)
    try:
        if sfx in PNG_SUFFIXES + TIFF_SUFFIXES:
            arr = _read_pil(path)
        elif sfx in ITK_SUFFIXES:
            arr = _read_itk(path)
        elif sfx in (".dcm", ".dicom") or _looks_like_dicom(path):
            arr = _read_dicom(path)
        else:
            raise ValueError(
                f"image {path}: unknown format {sfx or '(no suffix)'!r}; use PNG, TIFF, NRRD, NIfTI, MHA or DICOM"
            )
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # decoders raise many kinds of errors on corrupt data
        raise ValueError(f"image {path} could not be decoded ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"image {path} must be 2D (or 3D with one slice), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"image {path} contains NaN or infinite pixel values")
    return arr


def _read_pil(path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"image {path} is too large for an X-ray, refused before decoding") from None
    with im:
        w, h = im.size
        _check_dims(path, w, h, getattr(im, "n_frames", 1))
        if getattr(im, "n_frames", 1) > 1:
            raise ValueError(f"image {path} has {im.n_frames} frames; expected one X-ray")
        if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            im = im.convert("L")
        arr = np.array(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr


def _read_itk(path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    if len(size) == 3 and size[2] != 1:
        raise ValueError(f"image {path} is a volume of {size[2]} slices; expected one 2D X-ray")
    if len(size) not in (2, 3):
        raise ValueError(f"image {path} has {len(size)} dimensions; expected 2")
    if reader.GetNumberOfComponents() != 1:
        raise ValueError(f"image {path} has {reader.GetNumberOfComponents()} components per pixel; expected grey")
    _check_dims(path, size[0], size[1])
    arr = sitk.GetArrayFromImage(reader.Execute())
    return arr.reshape(size[1], size[0])


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def _read_dicom(path):
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    _check_dims(path, cols, rows, frames)
    if frames != 1:
        raise ValueError(f"DICOM {path} has {frames} frames; export the one X-ray to use")
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        raise ValueError(f"DICOM {path} is colour; expected a grey X-ray")
    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        arr = arr.max() - arr
    return arr


def write_image(path, array) -> Path:
    """Write a 2D image atomically; the format follows the suffix."""
    path = Path(path)
    a = np.asarray(array)
    if a.ndim != 2 and not (a.ndim == 3 and a.shape[2] in (3, 4) and a.dtype == np.uint8):
        raise ValueError(f"cannot write {path}: expected a 2D image, got shape {a.shape}")
    sfx = _suffix(path)
    if sfx in PNG_SUFFIXES + TIFF_SUFFIXES:
        if a.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"cannot write {path}: PNG/TIFF need uint8 or uint16 pixels, got {a.dtype}")
        from PIL import Image

        import io as _io

        buf = _io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG" if sfx == ".png" else "TIFF")
        return write_bytes_atomic(path, buf.getvalue())
    if sfx in ITK_SUFFIXES:
        import SimpleITK as sitk

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=sfx, dir=path.parent)
        os.close(fd)
        try:
            sitk.WriteImage(sitk.GetImageFromArray(a), tmp)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path
    raise ValueError(f"cannot write {path}: unknown image format {sfx!r}")


def write_png(path, array) -> Path:
    return write_image(Path(path), array)
