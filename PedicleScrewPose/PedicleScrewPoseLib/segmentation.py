"""Screw segmentation: a small 2D U-Net (MONAI) that labels every X-ray pixel as
background (0), screw head (1) or screw shaft (2).

Data flow (DESIGN.md): ``image float32 [v, u]`` → :func:`preprocess` (exposed
field, polarity, robust windowing) → U-Net → probabilities ``float32 [3, v, u]``
(background, head, shaft) at the image's own size.

The network never sees bit depth, window or polarity as such: :func:`preprocess`
maps any image to "larger = more attenuation", scaled by robust percentiles of
the pixels inside the exposed field (the black surround of an image intensifier
is detected and ignored).  Training (``training.py``) uses exactly this
function, so inference and training agree.

This module never imports the simulator (``xray``, ``simulate``, ``planning``,
``training``): ``run`` must work without it.
"""
from __future__ import annotations

import copy
import hashlib
import os
import weakref
from pathlib import Path

import numpy as np

__all__ = [
    "MODEL_DIR",
    "WEIGHTS_PATH",
    "ARCHITECTURE",
    "build_model",
    "load_model",
    "save_weights",
    "sha256_of",
    "segment",
    "preprocess",
    "field_mask",
    "labels_from_probabilities",
    "overlay",
    "add_segment_arguments",
    "segment_command",
]

MODEL_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
WEIGHTS_PATH = MODEL_DIR / "screw_unet.pt"
WEIGHTS_FORMAT = "pedicle-screw-unet/1"

# The shipped network: MONAI BasicUNet (two convolutions per level, max-pooling, 5 levels),
# 0.5 M parameters.  It learned screws several times faster on the CPU than MONAI's residual
# UNet did in the same time (both tried; see Resources/Models/README.md).
ARCHITECTURE = {
    "name": "monai.networks.nets.BasicUNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 3,
    "features": [16, 16, 32, 64, 128, 16],
}
#: Networks a weights file may name (its "arch" entry), with their MONAI class.
KNOWN_NETWORKS = ("monai.networks.nets.BasicUNet", "monai.networks.nets.UNet")

CLASS_NAMES = ("background", "head", "shaft")
MIN_SIDE_PX = 8           # smaller images are refused: nothing meaningful to segment
MAX_WORK_SIDE_PX = 1024   # larger images are downscaled for the network, probabilities upsampled back
#: The network sees images resampled to about this many mm per pixel at the isocentre, inside
#: the training crops' range (training.CROP_MM_PER_PX).  Finer images are area-averaged down to
#: it, which also averages quantum noise: on the pose benchmark's 0.3 mm/px lateral views, the
#: v2 weights' mean Dice rose from 0.35/0.39 (head/shaft) at full resolution to 0.63/0.73 here
#: (10 cases; 0.5, 0.65 and 0.75 mm/px did worse, for v2 and v3 alike).
TARGET_MM_PER_PX = 0.55
#: :func:`segment` also runs the network on the image in a local window
#: (:func:`local_contrast`, Gaussian sigma LOCAL_WINDOW_MM at the isocentre), mirrored too, and
#: averages.  Screen grabs compress the grey levels over dense bone (a lateral lumbar view) to
#: a few near white, where the global window leaves a screw a contrast of a few grey levels.
#: Pose benchmark, 30 cases, v5 weights: lateral mean Dice head/shaft 0.721/0.788 -> 0.769/0.817
#: (AP 0.908/0.842 -> 0.905/0.834, oblique 0.883/0.848 -> 0.885/0.850), lateral screws with
#: foreground along their axis 84.6% -> 87.5%; pose with AP + lateral: median angle / segment
#: error 1.21 deg / 1.24 mm -> 1.00 deg / 0.91 mm.  A 20 mm window: lateral 0.743/0.811.  Three
#: passes instead of four (either mirror left out) lose about half the lateral gain.
LOCAL_WINDOW_MM = 12.0
LOCAL_PASS = True
#: Where metal may be dark (hint "dark", or no hint), :func:`segment` also tries the image as
#: if it were linear in detected intensity (a raw detector image, or a renderer's ``I/I0``):
#: its log (:func:`attenuation_from_intensity`), metal bright.  In such an image the dense anatomy of a lateral
#: view is squeezed into the last few grey levels above black: on the plain second renderer's
#: lateral views shown that way (bench/voxel_render.py, 3 cases, 8 bit) the mean Dice
#: head / shaft went from 0.31 / 0.46 to 0.75 / 0.86.  It is kept only with
#: :data:`INTENSITY_MARGIN` times the kept reading's screw evidence and shaft evidence both: on
#: our simulator's dark displays (already log-like) both readings find the screws and evidence
#: alone chose the intensity reading, slightly worse, in 7 of 16 views (ratios 0.9-1.4); on the
#: plain renderer's lateral views where it helps, 1.9-3.0 (shaft 2.0-2.3), and 3.9 on one of
#: ours, where it helped too (shaft 4.8).  On one lateral view of the pose test set (noisy, 8
#: bit) its log made blobs of the noise at the dark end: screw evidence 1.54x, shaft 0.31x.
INTENSITY_CANDIDATE = True
INTENSITY_MARGIN = 1.5
#: Where the intensity reading was tried and lost to metal read dark, its answer (mirrored
#: too) still replaces the kept one's at the pixels where it sees more screw (lower background
#: probability), within its blobs that hold a confident shaft (:data:`FUSE_MIN_SHAFT_PEAK`).
#: One view can need both readings: on a lateral lumbar view shown dark, the thin thoracic half
#: reads best as displayed and the abdomen's last few grey levels above black best through the
#: log, which spreads them out.  Two more network passes on such views.  Pose, network, AP +
#: lateral, maps made on one thread, pairs / results: 20 tuning cases (seeds
#: bench_pose.TUNING_SEED_BASE + i) 165 / 182 -> 166 / 181; the 30-case test set 250 / 267 ->
#: 261 / 276, mostly lumbar screws of dark lateral views.  Taken at every pixel (no blob rule):
#: 166 / 182 and 262 / 278, but the segmentation test set's mean head Dice fell 0.542 -> 0.534
#: (with the blob rule 0.540; shaft 0.571 -> 0.570 either way); only over the blobs that the
#: kept answer missed (its mean screw probability under 0.5 there): 165 / 182 and 259 / 274.
FUSE_INTENSITY = True
#: The log spreads the noise at the dark end into head-sized blobs too (see
#: :data:`INTENSITY_MARGIN`); a screw is mostly shaft.
FUSE_MIN_SHAFT_PEAK = 0.9
#: The name of that third reading, beside "bright" and "dark".
INTENSITY = "intensity"
#: The image's local differences tell how it was made (:func:`display_response`).  In an image
#: linear in detected intensity with metal dark, they shrink where it is dark: quantum noise goes
#: as the square root of the intensity and an edge's contrast as the intensity itself.  In a log
#: display with metal dark they grow there (the dark end is where fewest photons arrived; edges
#: keep their contrast).  Where they say "linear", the intensity reading only has to beat the kept
#: one (margin 1); where they say "log", it is not tried: it would take the log of a log.
#: Thresholds (Spearman's rho of the differences against the grey level over ten bins, and the
#: differences of the top three bins over those of the bottom three), set on the second
#: renderer's views and our simulator's dark views of the pose test sets: the second renderer's
#: linear-intensity views rho >= 0.84, ratio >= 1.66 (38 views, 8 and 16 bit); our simulator's
#: dark log displays rho <= -0.5 and ratio <= 0.9 in 37 of 39 views; the second renderer's
#: noiseless log views between (rho -0.2 to 0.6), where :data:`INTENSITY_MARGIN` stays.
LINEAR_NOISE = (0.8, 1.5)
LOG_NOISE = (-0.5, 0.8)
#: Arithmetic of the network at inference: "auto" runs it in bfloat16 on a CPU that does
#: bfloat16 in hardware (AVX512-BF16 or AMX: ~2x faster, labels equal to float32's on all but
#: ~0.05% of pixels, mean Dice within 0.002 on the pose-benchmark views) and in float32
#: elsewhere (older CPUs emulate bfloat16 slowly; on CUDA float32 is fast enough).
PRECISION = "auto"
PRECISIONS = ("auto", "float32", "bfloat16")
#: Without geometry, a C-arm image is assumed to span this many mm at the isocentre (a 9-12"
#: image intensifier or flat panel, magnification ~1.3-1.5).
DEFAULT_FIELD_MM = 230.0
PAD_MULTIPLE = 16         # 4 stride-2 levels


# --------------------------------------------------------------------------- model
def build_model(arch: dict | None = None):
    """Return an untrained U-Net built from ``arch`` (default :data:`ARCHITECTURE`)."""
    a = dict(ARCHITECTURE if arch is None else arch)
    name = a.get("name", ARCHITECTURE["name"])
    if name not in KNOWN_NETWORKS:
        raise ValueError(f"unknown network {name!r}; expected one of {KNOWN_NETWORKS}")
    if name == "monai.networks.nets.BasicUNet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=int(a["spatial_dims"]), in_channels=int(a["in_channels"]),
                         out_channels=int(a["out_channels"]), features=tuple(int(f) for f in a["features"]))
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=int(a["spatial_dims"]),
        in_channels=int(a["in_channels"]),
        out_channels=int(a["out_channels"]),
        channels=tuple(int(c) for c in a["channels"]),
        strides=tuple(int(s) for s in a["strides"]),
        num_res_units=int(a["num_res_units"]),
    )


def sha256_of(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_sha256(path: Path) -> str:
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"{sidecar}: missing checksum file for the weights {path.name}; "
            "it must hold the SHA-256 (hex) of the weights file")
    text = sidecar.read_text(encoding="utf-8", errors="replace").split()
    digest = text[0].lower() if text else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{sidecar}: not a SHA-256 hex digest (expected 64 hex characters)")
    return digest


def load_model(path=None, device="cpu"):
    """Load the U-Net weights (default: the shipped ``Resources/Models/screw_unet.pt``).

    The file's SHA-256 must match ``<path>.sha256`` (else ``ValueError``: the file
    is corrupted or was tampered with); it is then read with
    ``torch.load(..., weights_only=True)`` (no code runs from the file).
    Returns the model in eval mode on ``device``.
    """
    import torch

    path = Path(WEIGHTS_PATH if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: segmentation weights not found")
    expected = _expected_sha256(path)
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"{path}: SHA-256 {actual} does not match {path.name}.sha256 ({expected}); "
            "the weights file is corrupted or was tampered with, refusing to load it")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a hash-valid but unreadable file is still bad input
        raise ValueError(f"{path}: cannot read weights ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT or "state_dict" not in blob:
        raise ValueError(f"{path}: not a {WEIGHTS_FORMAT} weights file (keys 'format', 'arch', 'state_dict')")
    model = build_model(blob.get("arch"))
    state = {k: v.float() for k, v in blob["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the architecture {blob.get('arch')}: {exc}") from exc
    model.eval()
    model.meta = dict(blob.get("meta", {}))
    return model.to(device)


def save_weights(model, path, meta: dict | None = None, half: bool = False) -> str:
    """Write ``model``'s state_dict (+ architecture, meta) atomically and its ``.sha256``.

    Returns the hex digest.  ``half=True`` stores float16 to halve the size.
    """
    import io as _io

    import torch

    from . import io

    path = Path(path)
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    blob = {"format": WEIGHTS_FORMAT, "arch": dict(ARCHITECTURE), "state_dict": state, "meta": dict(meta or {})}
    buf = _io.BytesIO()
    torch.save(blob, buf)
    io.write_bytes_atomic(path, buf.getvalue())
    digest = sha256_of(path)
    io.write_bytes_atomic(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
    return digest


# --------------------------------------------------------------------------- inference
def segment(images, model=None, metal=None, device="cpu", batch_size: int | None = None, mm_per_px=None,
            target_mm_per_px: float | None = None, mirror: bool = True, local: bool | None = None,
            precision: str | None = None):
    """Per-pixel probabilities (background, head, shaft) for each image.

    ``images``: list of 2D arrays ``[v, u]`` of any size, dtype and bit depth
    (a single 2D array is accepted too).  ``metal``: ``None`` (decide the
    polarity automatically), ``"bright"``/``"dark"``, or a list with one such
    entry (or ``None``) per image.  ``mm_per_px``: the pixel size at the isocentre
    (mm per detector pixel, from the view's geometry), one value or one per image
    (``None`` entries: assume the image spans ``DEFAULT_FIELD_MM``).  The network runs on
    the image resampled to ``target_mm_per_px`` (default ``TARGET_MM_PER_PX``; never
    upsampled), and the probabilities come back at full size.  Returns a list of
    ``float32 [3, v, u]`` arrays summing to 1 over the first axis.

    Automatic polarity: the network runs on both polarities and the one with
    more confident screw evidence is kept (a wrong polarity shows metal as the
    least attenuating thing in the image, which the network does not call a
    screw).  Where metal may be dark (hint "dark" or none), the image is also read as linear in
    intensity (:data:`INTENSITY_CANDIDATE`) and kept when clearly better; merely better is
    enough where the image's local differences say it is linear in intensity, and the reading is
    not tried where they say it is a log display (:func:`display_response`); where it was tried and
    lost to metal read dark, its answer is merged in where it sees more screw
    (:data:`FUSE_INTENSITY`).  ``mirror``: average
    with the network's answer on the left-right
    mirrored image (in the kept polarity only): one more pass per image, and on the
    held-out test set about +0.02 mean Dice per class (see the model card).  ``local``
    (default :data:`LOCAL_PASS`): average with the answer on the image in a local window
    (:func:`local_contrast`; mirrored too when ``mirror``), in the kept polarity.
    ``precision`` (default :data:`PRECISION`): the network's arithmetic, ``"auto"``,
    ``"float32"`` or ``"bfloat16"`` (see :data:`PRECISION`); the probabilities come back as
    float32 either way.  A constant image gives all background.  Raises ``ValueError`` for
    images that are not 2D, smaller than 8x8 pixels, or without a finite pixel.
    """
    import torch

    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    images = list(images)
    if isinstance(metal, (list, tuple)):
        if len(metal) != len(images):
            raise ValueError(f"metal: {len(metal)} hints for {len(images)} images")
        hints = list(metal)
    else:
        hints = [metal] * len(images)
    for h in hints:
        if h not in (None, "bright", "dark"):
            raise ValueError(f"metal: {h!r} is not 'bright', 'dark' or None")
    if isinstance(mm_per_px, (list, tuple, np.ndarray)):
        if len(mm_per_px) != len(images):
            raise ValueError(f"mm_per_px: {len(mm_per_px)} values for {len(images)} images")
        spacings = list(mm_per_px)
    else:
        spacings = [mm_per_px] * len(images)
    target = float(TARGET_MM_PER_PX if target_mm_per_px is None else target_mm_per_px)
    for s_mm in spacings:
        if s_mm is not None and not (np.isfinite(s_mm) and s_mm > 0):
            raise ValueError(f"mm_per_px: {s_mm!r} is not a positive number")
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"target_mm_per_px: {target!r} is not a positive number")
    if model is None:
        model = load_model(device=device)
    model = model.to(device).eval()
    dtype = network_dtype(device, PRECISION if precision is None else precision)
    if dtype != torch.float32:
        model = _cast_copy(model, dtype)
    if batch_size is None:
        # One image at a time on the CPU: faster than batches there (cache), ~0.5 s against
        # ~0.65 s for three 432x432 inputs on 2 threads; batches pay off on a GPU.
        batch_size = 1 if str(device).startswith("cpu") else 8

    # Work items: (image index, polarity, network input [h, w], original shape); per image, the
    # array, its work scale and its exposed field, for the further passes.
    work = []
    results: list[np.ndarray | None] = [None] * len(images)
    per_image: list[tuple] = []
    margins: dict[int, float] = {}  # the intensity reading's margin, by image
    for i, (img, hint, s_mm) in enumerate(zip(images, hints, spacings)):
        arr = _as_image(img, i)
        polarities = ["bright", "dark"] if hint is None else [hint]
        if INTENSITY_CANDIDATE and hint in (None, "dark"):
            polarities.append(INTENSITY)
        scale = work_scale(arr.shape, s_mm, target)
        fields: dict = {}  # the exposed field by reading: {False: as stored, True: intensity}
        shown: dict = {}   # reading -> (image, metal hint for preprocess), for the further passes
        for pol in polarities:
            if pol == INTENSITY:
                response = display_response(arr, fields.get(False))
                if response == "log":
                    break
                margins[i] = 1.0 if response == "linear" else INTENSITY_MARGIN
            src, metal_of_src = shown[pol] = _as_displayed(arr, pol)
            # The exposed field is black as stored, whatever the polarity: found once on the
            # stored image.  The intensity reading finds its own: there the dense anatomy is
            # black as stored and would pass for an unexposed surround.
            x, info = preprocess(src, metal=metal_of_src, return_info=True, field=fields.get(pol == INTENSITY))
            fields[pol == INTENSITY] = info["field"]
            if info["constant"]:
                break
            work.append((i, pol, _to_work_size(x, scale), arr.shape))
        per_image.append((arr, scale, fields, shown))
        if not work or work[-1][0] != i:
            # constant (or fieldless) image: nothing to see → all background
            p = np.zeros((3,) + arr.shape, np.float32)
            p[0] = 1.0
            results[i] = p

    probs_by_item = _run_network(model, [w[2] for w in work], device, batch_size)
    best: dict[int, tuple[float, np.ndarray, str]] = {}
    readings = {}
    for (i, pol, _x, shape), p in zip(work, probs_by_item):
        # Evidence at the working size (the same for both polarities); only the kept answer
        # is brought back to full size.
        if pol == INTENSITY:
            readings[i] = (p, shape)
            continue
        score = _screw_evidence(p)
        if i not in best or score > best[i][0]:
            best[i] = (score, p, pol, shape)
    for i, (p, shape) in readings.items():
        # The intensity reading must beat the kept one clearly, in all screw evidence and in
        # shaft evidence alike: its log spreads out the noise at the dark end too, into
        # head-sized blobs (on one of our dark log displays it gained evidence so, and lost
        # screws), while a screw is mostly shaft.
        screw = _screw_evidence(p)
        if i not in best or (screw > margins[i] * best[i][0]
                             and _shaft_evidence(p) > margins[i] * _shaft_evidence(best[i][1])):
            best[i] = (screw, p, INTENSITY, shape)
    # Where metal was read dark and the intensity reading lost, its answer is still merged in
    # where it sees more screw (see FUSE_INTENSITY): kept aside here, at full size.
    fuse = {i: _resize_probs(p, shape) for i, (p, shape) in readings.items()
            if FUSE_INTENSITY and best[i][2] == "dark"}
    best = {i: (score, _resize_probs(p, shape), pol) for i, (score, p, pol, shape) in best.items()}
    # Further passes in the kept polarity, averaged with the first: the mirrored image, and
    # the image in a local window (see LOCAL_WINDOW_MM).  Each item: (image, input, shape,
    # mirrored, the answer it is averaged into: the kept one's, or the intensity reading's).
    keep = [(i, pol, x, shape) for (i, pol, x, shape) in work if pol == best[i][2]]
    extra: list[tuple[int, np.ndarray, tuple, bool, bool]] = []
    if mirror:
        # A screw looks the same in a mirror; the network's errors mostly do not, so the
        # average of both answers is steadier (test-time augmentation with a training flip).
        extra += [(i, np.ascontiguousarray(x[:, ::-1]), shape, True, False) for i, _pol, x, shape in keep]
        extra += [(i, np.ascontiguousarray(x[:, ::-1]), shape, True, True) for i, pol, x, shape in work
                  if pol == INTENSITY and i in fuse]
    if LOCAL_PASS if local is None else local:
        for i, pol, _x, shape in keep:
            arr, scale, fields, shown = per_image[i]
            src, metal_of_src = shown[pol]  # the intensity reading's log is not taken twice
            field = fields[pol == INTENSITY]
            sigma_px = LOCAL_WINDOW_MM / _pixel_mm(arr.shape, spacings[i])
            xl = _to_work_size(preprocess(local_contrast(src, field, sigma_px), metal=metal_of_src, field=field),
                               scale)
            extra.append((i, xl, shape, False, False))
            if mirror:
                extra.append((i, np.ascontiguousarray(xl[:, ::-1]), shape, True, False))
    if extra:
        outs = _run_network(model, [item[1] for item in extra], device, batch_size)
        sums = {False: {i: best[i][1].copy() for i in best}, True: fuse}
        counts = {False: {i: 1 for i in best}, True: {i: 1 for i in fuse}}
        for (i, _x, shape, flipped, into_fuse), p in zip(extra, outs):
            if flipped:
                p = np.ascontiguousarray(p[:, :, ::-1])
            sums[into_fuse][i] += _resize_probs(p, shape)
            counts[into_fuse][i] += 1
        best = {i: (best[i][0], sums[False][i] / counts[False][i], best[i][2]) for i in best}
        fuse = {i: sums[True][i] / counts[True][i] for i in fuse}
    for i, q in fuse.items():
        best[i] = (best[i][0], _merge_intensity(best[i][1], q), best[i][2])
    for i, (_s, p, _pol) in best.items():
        results[i] = suppress_specks(p)
    return results


def _merge_intensity(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The kept answer ``p`` ([3, v, u]) with the intensity reading's answer ``q`` taken at the
    pixels where ``q`` sees more screw (lower background probability), within ``q``'s screw
    blobs (8-connected, background under 0.5) that hold a confident shaft
    (:data:`FUSE_MIN_SHAFT_PEAK`)."""
    from scipy import ndimage

    blobs, n = ndimage.label(q[0] < 0.5, structure=np.ones((3, 3), bool))
    if n == 0:
        return p
    peak = np.asarray(ndimage.maximum(q[2], blobs, index=np.arange(1, n + 1)))
    take = np.concatenate([[False], peak >= FUSE_MIN_SHAFT_PEAK])[blobs] & (q[0] < p[0])
    return np.where(take[None], q, p).astype(np.float32)


#: Screw blobs smaller than this fraction of the image area are noise, not screws: a screw head
#: alone covers ~0.1% of a 512x512 view at the coarsest usual magnification.
MIN_BLOB_FRACTION = 1.5e-4


def suppress_specks(p: np.ndarray, min_fraction: float = MIN_BLOB_FRACTION) -> np.ndarray:
    """Move the probability of tiny isolated screw blobs to background.

    Quantum noise in dark, dense regions gives the network scattered one-to-few-pixel
    detections; no screw is that small, and they mislead the instance finder.
    """
    from scipy import ndimage

    fg = p[1:].sum(0) > p[0]
    lab, n = ndimage.label(fg, structure=np.ones((3, 3), bool))
    if n == 0:
        return p
    sizes = np.bincount(lab.ravel())
    min_px = max(4, int(min_fraction * fg.size))
    small = (sizes < min_px)
    small[0] = False
    kill = small[lab]
    if kill.any():
        p = p.copy()
        p[0][kill] += p[1][kill] + p[2][kill]
        p[1][kill] = 0.0
        p[2][kill] = 0.0
    return p


def _as_image(img, index=0) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape.count(1) == 1:  # a 3D image with one slice
        arr = arr.reshape([s for s in arr.shape if s != 1])
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise ValueError(f"image {index}: shape {arr.shape} looks like a colour image; expected a 2D grey image [v, u]")
    if arr.ndim != 2:
        raise ValueError(f"image {index}: expected a 2D grey image [v, u], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"image {index}: empty image (shape {arr.shape})")
    if min(arr.shape) < MIN_SIDE_PX:
        raise ValueError(f"image {index}: {arr.shape[0]}x{arr.shape[1]} pixels is too small to segment "
                         f"(need at least {MIN_SIDE_PX}x{MIN_SIDE_PX})")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"image {index}: pixel type {arr.dtype} is not a real number type")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).any():
        raise ValueError(f"image {index}: no finite pixel (all NaN/inf)")
    return arr


def _pixel_mm(shape, mm_per_px=None) -> float:
    """The pixel size at the isocentre: ``mm_per_px``, else the image spanning ``DEFAULT_FIELD_MM``."""
    return float(mm_per_px) if mm_per_px is not None else DEFAULT_FIELD_MM / max(shape)


def work_scale(shape, mm_per_px=None, target_mm_per_px: float = TARGET_MM_PER_PX) -> float:
    """Factor (<= 1) by which an image of ``shape`` is resampled for the network: to
    ``target_mm_per_px`` at the isocentre, and to at most ``MAX_WORK_SIDE_PX`` on a side."""
    side = max(shape)
    f = min(1.0, _pixel_mm(shape, mm_per_px) / float(target_mm_per_px), MAX_WORK_SIDE_PX / side)
    # Not below 64 px on the short side: the network's 4 pooling levels need room.
    return max(f, min(1.0, 64.0 / min(shape)))


def _to_work_size(x: np.ndarray, f: float) -> np.ndarray:
    """Area-average ``x`` down by the factor ``f`` (from :func:`work_scale`)."""
    h, w = x.shape
    if f >= 0.999:
        return x
    import torch
    import torch.nn.functional as F

    size = (max(MIN_SIDE_PX, round(h * f)), max(MIN_SIDE_PX, round(w * f)))
    t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
    return F.interpolate(t, size=size, mode="area")[0, 0].numpy()


def _resize_probs(p: np.ndarray, shape) -> np.ndarray:
    if p.shape[1:] == tuple(shape):
        return p
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(p)[None]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0]
    out = out.clamp_min(0)
    return (out / out.sum(0, keepdim=True).clamp_min(1e-6)).numpy().astype(np.float32)


def network_dtype(device, precision: str = "auto"):
    """The torch dtype the network runs in for ``precision`` (see :data:`PRECISION`) on ``device``."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if not str(device).startswith("cpu"):
        return torch.float32
    return torch.bfloat16 if cpu_has_bfloat16() else torch.float32


def precision_name(device, precision: str | None = None) -> str:
    """``"float32"`` or ``"bfloat16"``: what ``precision`` (default :data:`PRECISION`) runs the
    network in on ``device`` here (for benchmark records)."""
    return str(network_dtype(device, PRECISION if precision is None else precision)).replace("torch.", "")


_CAST_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cast_copy(model, dtype):
    """``model`` in ``dtype``, as a copy (the caller's model stays as it was), kept while the
    model lives and its weights are unchanged (a copy costs ~40 ms, a third of a pass)."""
    key = (dtype, tuple((p.data_ptr(), p._version) for p in model.parameters()))
    hit = _CAST_COPIES.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    cast = copy.deepcopy(model).to(dtype).eval()
    _CAST_COPIES[model] = (key, cast)
    return cast


def cpu_has_bfloat16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX tiles)."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def _run_network(model, inputs, device, batch_size):
    """Softmax probabilities ``[3, h, w]`` per input; inputs padded to a multiple of 16, batched by size."""
    import torch
    import torch.nn.functional as F

    out: list[np.ndarray | None] = [None] * len(inputs)
    dtype = next(model.parameters()).dtype  # the inputs follow the model's arithmetic
    groups: dict[tuple, list[int]] = {}
    for k, x in enumerate(inputs):
        groups.setdefault(x.shape, []).append(k)
    with torch.inference_mode():
        for shape, idx in groups.items():
            h, w = shape
            ph = (-h) % PAD_MULTIPLE
            pw = (-w) % PAD_MULTIPLE
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                t = torch.from_numpy(np.stack([inputs[k] for k in chunk]))[:, None].to(device, dtype)
                if ph or pw:
                    # replicate: no artificial edge for the network to call metal
                    t = F.pad(t, (0, pw, 0, ph), mode="replicate")
                logits = model(t)[:, :, :h, :w]
                probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
                for k, p in zip(chunk, probs):
                    out[k] = p.astype(np.float32)
    return out


def attenuation_from_intensity(image) -> np.ndarray:
    """``-log`` of an image taken as linear in detected intensity (metal dark), so that metal and
    bone come out bright and the dark end is spread out.  The image's minimum maps to an offset
    of 1/255 of its range, so that black pixels stay finite and 8-bit quantisation noise at the
    dark end is not blown up."""
    a = np.asarray(image, np.float64)
    finite = np.isfinite(a)
    lo = float(a[finite].min())
    off = max(float(a[finite].max()) - lo, 1e-6) / 255.0
    with np.errstate(invalid="ignore"):
        return (-np.log(np.where(finite, a - lo, np.nan) + off)).astype(np.float32)


def noise_trend(image, field=None) -> tuple[float, float] | None:
    """How the local differences of ``image`` (its noise, and the contrast of its edges) change
    with its grey level: (Spearman's rho of the differences against the level over ten bins of
    the local mean, from its 5th to 95th percentile inside ``field``; the mean difference of the
    top three bins over that of the bottom three).  A pixel's difference is the smaller of its
    horizontal and vertical ones, so that an edge, steep one way, counts little.  Clipped pixels
    (at the field's minimum or maximum) are left out: they have no noise.  ``None`` when too few
    pixels remain, a bin is empty (a few grey levels only) or the dark end has no differences."""
    from scipy import ndimage

    a = np.asarray(image, np.float64)
    f = np.isfinite(a) if field is None else (np.asarray(field, bool) & np.isfinite(a))
    if f.sum() < 1000:
        return None
    lo, hi = float(a[f].min()), float(a[f].max())
    a = np.where(np.isfinite(a), a, lo)
    level = ndimage.uniform_filter(a, 5)[:-1, :-1]
    noise = np.minimum(np.abs(np.diff(a, axis=1))[:-1, :], np.abs(np.diff(a, axis=0))[:, :-1])
    ok = (ndimage.binary_erosion(f, iterations=3) & (a > lo) & (a < hi))[:-1, :-1]
    if ok.sum() < 1000:
        return None
    level, noise = level[ok], noise[ok]
    edges = np.quantile(level, np.linspace(0.05, 0.95, 11))
    bins = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, 9)
    inside = (level >= edges[0]) & (level <= edges[-1])
    counts = np.bincount(bins[inside], minlength=10)
    if (counts == 0).any():
        return None
    per_bin = np.bincount(bins[inside], noise[inside], minlength=10) / counts
    if not per_bin[:3].mean() > 0 or np.ptp(per_bin) == 0:
        return None
    ranks = np.argsort(np.argsort(per_bin))
    rho = float(np.corrcoef(np.arange(10), ranks)[0, 1])
    return rho, float(per_bin[-3:].mean() / per_bin[:3].mean())


def display_response(image, field=None) -> str | None:
    """"linear" where the local differences of ``image`` (:func:`noise_trend`) rise with its grey
    level as in an image linear in detected intensity with metal dark (or a log display with
    metal bright), "log" where they fall as in a log display with metal dark (or a linear one
    with metal bright), ``None`` where they do not say (no noise, a flat trend).  See
    :data:`LINEAR_NOISE`."""
    trend = noise_trend(image, field)
    if trend is None:
        return None
    rho, ratio = trend
    if rho >= LINEAR_NOISE[0] and ratio >= LINEAR_NOISE[1]:
        return "linear"
    if rho <= LOG_NOISE[0] and ratio <= LOG_NOISE[1]:
        return "log"
    return None


def _as_displayed(arr: np.ndarray, reading: str) -> tuple[np.ndarray, str]:
    """(image, metal hint for :func:`preprocess`) of one reading of ``arr``: "bright", "dark" or
    :data:`INTENSITY`."""
    if reading == INTENSITY:
        return attenuation_from_intensity(arr), "bright"
    return arr, reading


def _confident_sum(q: np.ndarray) -> float:
    return float(q[q > 0.5].sum())


def _screw_evidence(p: np.ndarray) -> float:
    """Confident screw evidence: sum of (1 - p_background) over pixels the network calls screw."""
    return _confident_sum(1.0 - p[0])


def _shaft_evidence(p: np.ndarray) -> float:
    """Confident shaft evidence: sum of p_shaft over pixels where it passes 0.5."""
    return _confident_sum(p[2])


#: A screw blob of the label map (4-connected head and shaft pixels) whose most confident pixel
#: has a screw probability (head + shaft) below this is background: the network's doubtful blobs
#: are mostly noise, bone edges and wires.  Tuning images (the segmentation benchmark's groups
#: from seed 31415926, not the test seed: 300 scorings of 140 images), mean Dice head / shaft:
#: arg-max 0.520 / 0.546, with this 0.541 / 0.553 (0.8: 0.531 / 0.548; 0.95: 0.536 / 0.559).  On
#: the second renderer's pose views (4 sets, 120 views) and 60 of our pose tuning views it moved
#: each set's mean Dice by 0.000 to +0.005, never down.
LABEL_MIN_PEAK = 0.9


def labels_from_probabilities(probs, min_peak: float = LABEL_MIN_PEAK) -> np.ndarray:
    """uint8 ``[v, u]`` label map (0 background, 1 head, 2 shaft) by arg-max of ``[3, v, u]``
    probabilities, less the screw blobs whose highest screw probability is under ``min_peak``
    (:data:`LABEL_MIN_PEAK`; 0 keeps the plain arg-max)."""
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] != 3:
        raise ValueError(f"probabilities: expected shape [3, v, u], got {p.shape}")
    labels = np.argmax(p, axis=0).astype(np.uint8)
    if min_peak > 0 and labels.any():
        from scipy import ndimage  # noqa: PLC0415

        blobs, n = ndimage.label(labels > 0)
        screw = p[1].astype(np.float32) + p[2].astype(np.float32)
        peak = ndimage.maximum(screw, blobs, index=np.arange(1, n + 1))
        doubtful = np.concatenate([[False], np.asarray(peak) < min_peak])
        labels[doubtful[blobs]] = 0
    return labels


# --------------------------------------------------------------------------- preprocessing
def preprocess(image, metal=None, return_info: bool = False, field=None):
    """Map any X-ray to the network's input: float32 ``[v, u]``, larger = more attenuation.

    1. ``metal == "dark"`` (metal shown dark, e.g. raw detector intensity or an
       inverted fluoroscopy display) flips the sign; ``"bright"`` or ``None`` keep it.
    2. The exposed field is found (:func:`field_mask`): a uniform surround touching
       the border (image intensifier's black circle, collimator) is ignored.
    3. Robust window: the 1st and 99th percentiles inside the field map to 0 and 1;
       values are clipped to [-0.5, 2.0] (metal may exceed 1, which is informative).
       Pixels outside the field are windowed alike (not blanked).
    Non-finite pixels are set to the field's median.  ``return_info=True`` also
    returns a dict (``field``: bool mask, ``constant``: True if the field has no contrast).
    ``field``: the image's :func:`field_mask` when already known (it does not depend on
    ``metal``), to save finding it again.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"preprocess: expected a 2D image, got shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.any():
        raise ValueError("preprocess: no finite pixel (all NaN/inf)")
    if not finite.all():
        arr = np.where(finite, arr, np.median(arr[finite])).astype(np.float32)
    if metal not in (None, "bright", "dark"):
        raise ValueError(f"metal: {metal!r} is not 'bright', 'dark' or None")
    if field is None:
        field = field_mask(arr)  # on the image as stored: its unexposed surround is black
    elif np.shape(field) != arr.shape:
        raise ValueError(f"preprocess: field of shape {np.shape(field)} for an image of shape {arr.shape}")
    field = np.asarray(field, bool) & finite
    if metal == "dark":
        arr = -arr
    vals = arr[field] if field.sum() >= 16 else arr[finite]
    if vals.size > 200_000:  # percentiles of a fixed subsample: same result, faster
        vals = vals[:: vals.size // 200_000 + 1]
    lo, hi = np.percentile(vals, [1.0, 99.0])
    if not hi - lo > 1e-6 * max(1.0, abs(float(hi)), abs(float(lo))):
        lo, hi = float(vals.min()), float(vals.max())
    constant = not hi - lo > 1e-6 * max(1.0, abs(float(hi)), abs(float(lo)))
    if constant:
        x = np.zeros_like(arr)
    else:
        # The field only sets the window: pixels outside it keep their values (a saturated dark
        # screw can look like the surround; the network has seen both in training).
        x = np.clip((arr - lo) / (hi - lo), -0.5, 2.0)
    x = x.astype(np.float32)
    if return_info:
        return x, {"field": field, "constant": bool(constant), "lo": float(lo), "hi": float(hi)}
    return x


def local_contrast(image, field, sigma_px: float) -> np.ndarray:
    """``image`` in a local window: minus its Gaussian-weighted mean over ``sigma_px``, over
    the local standard deviation (both over the exposed ``field`` only; outside it, the
    field's lowest value).  A screw over dense bone, where a screen grab has compressed the
    grey levels into a few near white, comes out with the contrast of one over soft tissue.
    Non-finite pixels count as outside the field."""
    a = np.asarray(image, np.float32)
    finite = np.isfinite(a)
    f = (np.asarray(field, bool) if field is not None else np.ones(a.shape, bool)) & finite
    if f.sum() < 16:
        f = finite
    if f.sum() < 16:
        return np.zeros(a.shape, np.float32)
    a = np.where(f, a - float(np.median(a[f])), 0.0).astype(np.float32)
    w = _smooth(f.astype(np.float32), sigma_px)
    w = np.maximum(w, 1e-3)
    mean = _smooth(a, sigma_px) / w
    # The local spread of the high-passed image (not E[a^2] - E[a]^2): a strong edge
    # nearby widens it less.
    var = np.maximum(_smooth(np.where(f, (a - mean) ** 2, 0.0), sigma_px) / w, 0.0)
    # The floor keeps flat regions (saturated white, constant padding) from being blown up.
    floor = 1e-3 * float(np.var(a[f])) + 1e-12
    out = (a - mean) / np.sqrt(var + floor)
    out[~f] = float(out[f].min())
    return out.astype(np.float32)


def _smooth(x: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of width ``sigma_px`` with mirrored edges, by FFT: a wide window at a
    fraction of the cost of a direct one, and mirror-symmetric (so the mirrored pass of
    :func:`segment` sees the mirrored local window).  Single precision and a fast FFT size
    (zeros beyond the mirrored margin, which the kernel's 3-sigma reach never crosses)."""
    from scipy import fft, ndimage

    pad = int(np.ceil(3.0 * sigma_px))
    pad = min(pad, min(x.shape) - 1)
    xp = np.pad(np.asarray(x, np.float32), pad, mode="reflect") if pad > 0 else np.asarray(x, np.float32)
    shape = tuple(fft.next_fast_len(n, real=True) for n in xp.shape)
    spec = fft.rfft2(xp, s=shape, workers=-1)
    spec = ndimage.fourier_gaussian(spec, sigma_px, n=shape[1])
    out = fft.irfft2(spec, s=shape, workers=-1)[: xp.shape[0], : xp.shape[1]]
    if pad > 0:
        out = out[pad:-pad, pad:-pad]
    return np.ascontiguousarray(out, np.float32)


def field_mask(image) -> np.ndarray:
    """Boolean ``[v, u]`` mask of the exposed field.

    The unexposed surround (an image intensifier's circle, collimator blades,
    a black frame) is a near-uniform region touching the image border at the
    image's minimum value (black as stored, whatever the polarity).  It is found
    on a 3x3-median-filtered image (robust to noise) as the border-connected
    pixels within 2% of the robust range of the minimum.  Returns all True when
    no such region covers at least 3% of the image and 10% of its border, or
    when it would leave less than 10% exposed.
    """
    from scipy import ndimage

    arr = np.asarray(image, dtype=np.float32)
    h, w = arr.shape
    full = np.ones((h, w), bool)
    if h < 16 or w < 16:
        return full
    # work on a coarse grid for speed on big images
    step = max(1, int(max(h, w) // 512))
    small = arr[::step, ::step]
    small = ndimage.median_filter(small, size=3, mode="nearest")
    p1, p99 = np.percentile(small, [1, 99])
    rng = float(p99 - p1)
    if rng <= 0:
        rng = float(small.max() - small.min())
    if rng <= 0:
        return full
    tol = 0.02 * rng
    best = None
    # Only the dark extreme: displays and raw detector data alike show the unexposed surround
    # black; a saturated white region (metal, air) touching the border is image content.
    for extreme in (float(small.min()),):
        near = small - extreme <= tol
        lab, n = ndimage.label(near)
        edge_labels = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        edge_labels = edge_labels[edge_labels > 0]
        surround = np.isin(lab, edge_labels)
        frac = surround.mean()
        on_border = np.concatenate([surround[0], surround[-1], surround[:, 0], surround[:, -1]]).mean()
        # a surround covers a good part of the border (circle: the corners; collimator: a side);
        # a dark screw or wire that merely touches the border does not
        if frac >= 0.03 and on_border >= 0.10:
            best = (frac, surround)
    if best is None or best[0] > 0.9:
        return full
    # close small holes (text burned into the surround) and grow 1 px past the soft rim
    # Opening removes narrow dark protrusions (a saturated dark screw or wire touching the circle's
    # rim is image content); closing fills text burned into the surround; padded with edge values
    # because scipy's morphology would erode the surround along the image border.
    r = max(2, int(round(0.015 * min(small.shape))))
    padded = np.pad(best[1], r + 3, mode="edge")
    opened = ndimage.binary_opening(padded, iterations=r)
    surround = ndimage.binary_dilation(ndimage.binary_closing(opened, iterations=2), iterations=1)[r + 3:-(r + 3), r + 3:-(r + 3)]
    if step > 1:
        surround = np.repeat(np.repeat(surround, step, 0), step, 1)[:h, :w]
    mask = ~surround
    if mask.mean() < 0.1:
        return full
    return mask


# --------------------------------------------------------------------------- overlay
HEAD_RGB = (255, 140, 0)    # orange
SHAFT_RGB = (0, 200, 255)   # cyan


def overlay(image, labels, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 ``[v, u, 3]``: the X-ray (robustly windowed, as stored) with head / shaft tinted."""
    arr = np.asarray(image, dtype=np.float32)
    lab = np.asarray(labels)
    if arr.ndim != 2 or lab.shape != arr.shape:
        raise ValueError(f"overlay: image {arr.shape} and labels {lab.shape} must be the same 2D shape")
    finite = np.isfinite(arr)
    if finite.any():
        lo, hi = np.percentile(arr[finite], [0.5, 99.5])
        g = np.clip((np.where(finite, arr, lo) - lo) / max(float(hi - lo), 1e-6), 0, 1)
    else:
        g = np.zeros_like(arr)
    rgb = np.repeat((g * 255.0)[..., None], 3, axis=2)
    for cls, colour in ((1, HEAD_RGB), (2, SHAFT_RGB)):
        m = lab == cls
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(colour, np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- CLI
def add_segment_arguments(parser) -> None:
    parser.add_argument("case_dir", help="case folder (case.json + images)")
    parser.add_argument("--out", required=True, help="output folder (not the case folder)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--weights", default=None, help="weights file (default: the shipped model)")
    add_precision_argument(parser)


def add_precision_argument(parser) -> None:
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="the network's arithmetic (default auto: bfloat16 on a CPU that has it, else float32)")


def segment_command(args) -> int:
    from . import io

    case_dir = Path(args.case_dir)
    out = Path(args.out)
    io.ensure_output_dir_outside(out, case_dir)
    case = io.read_case(case_dir)
    model = load_model(args.weights, device=args.device)
    _set_threads()
    probs = segment_views(case.views, case.images, model=model, device=args.device,
                          precision=getattr(args, "precision", None))
    out.mkdir(parents=True, exist_ok=True)
    for view, img, p in zip(case.views, case.images, probs):
        labels = labels_from_probabilities(p)
        base = io.safe_view_filename(view.name)
        io.write_png(out / f"{base}_labels.png", labels)
        io.write_png(out / f"{base}_overlay.png", overlay(img, labels))
        n_head, n_shaft = int((labels == 1).sum()), int((labels == 2).sum())
        print(f"{view.name}: head {n_head} px, shaft {n_shaft} px -> {base}_labels.png, {base}_overlay.png")
    return 0


def segment_views(views, images, model=None, device="cpu", precision: str | None = None) -> list:
    """:func:`segment` for the images of calibrated views: each view's ``metal`` hint and its
    pixel size at the scene centre (:func:`view_spacings`) go with its image."""
    return segment(images, model=model, metal=[getattr(v, "metal", None) for v in views], device=device,
                   mm_per_px=view_spacings(views), precision=precision)


def view_spacings(views) -> list:
    """Pixel size (mm/px) of each view at the middle of the scene (the spine), from the
    views' projection matrices; None for all when the scene centre is undefined."""
    from . import correspondence

    try:
        centre = correspondence.scene_centre(views)
        out = [float(correspondence.mm_per_px_at(v, centre)) for v in views]
    except (ValueError, np.linalg.LinAlgError):
        return [None] * len(views)
    # A centre behind a source (odd geometry) gives no usable size: fall back to the default.
    return [s if np.isfinite(s) and 0.01 < s < 10.0 else None for s in out]


def _set_threads():
    import torch

    # One thread unless OMP_NUM_THREADS says otherwise: on a shared, loaded 2-core machine two
    # threads made a 512x512 forward pass 15x slower (1.1 s vs 0.075 s, bench_segmentation.py).
    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(1)
