"""X-ray simulation of a CT with titanium screws and other metal, as a C-arm would show it.

Frames and units (CASE_FORMAT.md): world RAS millimetres; pixels ``(u, v)`` =
(column, row), 0-based, centres at integers; every image is ``[v, u]``. A view's
``P`` maps homogeneous RAS to homogeneous pixels; rays leave the source
(:func:`geometry.source_position`) through pixel centres.

The steps, each a public function:

1. :func:`ct_line_integrals` -- areal density (g/cm^2) of each CT material along
   each ray: Joseph's method, i.e. the volume is cut into slices across the
   view's main axis and each slice is sampled bilinearly where the rays cross
   it (``torch.nn.functional.grid_sample``). This is the cost of a render; cache
   it per (CT, view) (:func:`simulate_view` does when given a ``cache`` dict).
2. :func:`screw_path_lengths` -- titanium path length (mm) per pixel, head and
   shaft apart, by ray-marching each screw's attenuation volume
   (:func:`screw.attenuation_volume`) only along the rays of its projected box.
3. :func:`label_map` -- 0 background, 1 head, 2 shaft (CASE_FORMAT.md rule).
4. :func:`distractor_line_integrals` -- metal that is not a screw (K-wires, rods,
   retractors, ECG electrodes and leads, table rails, calibration beads) as
   analytic 3D shapes with exact chords; never in the label map.
5. :func:`detect` -- polychromatic physics: a ``spekpy`` spectrum, mass
   attenuation per material (NIST, via :mod:`ct`), an energy-integrating
   detector (beam hardening by bone and titanium follows), scatter, quantum
   noise at a chosen dose, detector blur.
6. :func:`display` -- what the C-arm writes: log or linear response, window,
   gamma, polarity (metal bright or dark), image-intensifier circle with a black
   surround and vignetting, optional pincushion distortion, burned-in text and
   markers, 8- or 16-bit.

Pincushion distortion moves pixels, so the truth ``P`` no longer matches the
image exactly (by up to ``pincushion * r_max`` pixels at the edge); the label map
is warped identically so it always matches the image. ``RenderParams.ideal()``
and the default evaluation cases use none.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry

__all__ = [
    "RenderParams",
    "SimulatedView",
    "PreparedCT",
    "Distractor",
    "prepare_ct",
    "ct_line_integrals",
    "screw_path_lengths",
    "label_map",
    "labels_from_path_lengths",
    "distractor_line_integrals",
    "random_distractors",
    "add_distractors",
    "spectrum",
    "detect",
    "display",
    "simulate_view",
    "render_view",
    "LABEL_THRESHOLD_MM",
    "DENSITY_G_CM3",
]

# A pixel is labelled head/shaft when its ray crosses at least this much of that material.
# The attenuation volume is a partial-volume fraction sampled trilinearly, so exact zero is
# never reached at the surface; 0.05 mm is a ray grazing a 3 mm radius thread at ~0.1 um
# from its surface: "any material on its ray" up to sampling precision.
LABEL_THRESHOLD_MM = 0.05

# Densities (g/cm^3) of the metals drawn here; ct.DENSITY_G_CM3 wins where it has them.
DENSITY_G_CM3 = {"titanium": 4.43, "steel": 8.0,
                 "soft": 1.0, "bone": 1.92, "air": 0.0012}


def _ct_module():
    from . import ct  # the anatomy helper's module (materials, densities, NIST attenuation)

    return ct


def _density(material: str) -> float:
    try:
        d = getattr(_ct_module(), "DENSITY_G_CM3", {})
        if material in d:
            return float(d[material])
    except ImportError:
        pass
    if material not in DENSITY_G_CM3:
        raise ValueError(f"unknown material {material!r}; known: {sorted(DENSITY_G_CM3)}")
    return DENSITY_G_CM3[material]


# =============================================================================== parameters
@dataclass
class RenderParams:
    """How a view is rendered: physics, detector and display (all optional effects off = ideal).

    Units: ``kvp`` kV, ``filtration_mm_al`` / ``filtration_mm_cu`` mm, ``photons_per_pixel``
    photons detected at the median pixel of the central field, as an automatic exposure control
    sets the dose (None: no quantum noise), ``scatter_fraction``
    scatter-to-primary ratio relative to the blurred primary, ``scatter_sigma`` and
    ``field_radius`` as fractions of the image width, ``blur_px`` Gaussian PSF sigma in
    pixels, ``pincushion`` radial distortion coefficient (displacement at the image corner
    over the corner radius), ``heel`` relative intensity change across the image (anode heel).
    """

    kvp: float = 90.0
    filtration_mm_al: float = 3.0
    filtration_mm_cu: float = 0.0
    monochromatic_kev: float | None = None
    n_energy_bins: int = 12
    photons_per_pixel: float | None = 5000.0   # at the median pixel of the central field (AEC)
    electronic_noise: float = 0.0        # std of additive read noise, fraction of the flat field
    scatter_fraction: float = 0.3
    scatter_sigma: float = 0.12
    blur_px: float = 0.7
    heel: float = 0.0
    collimator: tuple | None = None      # (left, top, right, bottom) fractions of the image shuttered
    collimator_transmission: float = 0.04
    response: str = "log"                # "log" (-log I/I0) or "linear" (1 - I/I0)
    drc: float = 0.0                     # dynamic range compression: fraction of the low-pass removed
    drc_sigma: float = 0.08              # its low-pass sigma, fraction of the width
    edge_enhance: float = 0.0            # unsharp-mask amount
    edge_sigma_px: float = 2.0           # its sigma, pixels
    window_low_pct: float = 0.5
    window_high_pct: float = 99.5
    gamma: float = 1.0
    metal: str = "bright"                # "bright": attenuation bright (radiograph); "dark": fluoroscopy monitor
    field: str = "square"                # "square" (flat panel) or "circle" (image intensifier)
    field_radius: float = 0.49
    vignetting: float = 0.0
    pincushion: float = 0.0
    bit_depth: int = 8
    bits_stored: int | None = None      # 16-bit output: 12, 14 or 16 significant bits (None: 16)
    burned_text: bool = False
    markers: bool = False
    seed_salt: int = 0                   # free field for callers that want variants of one params set

    def __post_init__(self):
        if self.metal not in ("bright", "dark"):
            raise ValueError(f"RenderParams.metal must be 'bright' or 'dark', got {self.metal!r}")
        if self.field not in ("square", "circle"):
            raise ValueError(f"RenderParams.field must be 'square' or 'circle', got {self.field!r}")
        if self.response not in ("log", "linear"):
            raise ValueError(f"RenderParams.response must be 'log' or 'linear', got {self.response!r}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"RenderParams.bit_depth must be 8 or 16, got {self.bit_depth!r}")
        if not (20.0 <= self.kvp <= 150.0):
            raise ValueError(f"RenderParams.kvp must be within 20..150 kV, got {self.kvp!r}")
        if self.photons_per_pixel is not None and not self.photons_per_pixel > 0:
            raise ValueError(f"RenderParams.photons_per_pixel must be positive or None, got {self.photons_per_pixel!r}")
        if not (0.0 <= self.window_low_pct < self.window_high_pct <= 100.0):
            raise ValueError("RenderParams: need 0 <= window_low_pct < window_high_pct <= 100")
        if not self.gamma > 0:
            raise ValueError(f"RenderParams.gamma must be positive, got {self.gamma!r}")

    @classmethod
    def ideal(cls) -> "RenderParams":
        """Noise-free, monochromatic (60 keV), no scatter/blur/distortion, log response, metal bright, 16-bit."""
        return cls(monochromatic_kev=60.0, photons_per_pixel=None, scatter_fraction=0.0, blur_px=0.0,
                   field="square", vignetting=0.0, pincushion=0.0, bit_depth=16, metal="bright",
                   window_low_pct=0.0, window_high_pct=100.0, gamma=1.0)

    @classmethod
    def random(cls, rng, distortion: bool = False, metal: str | None = None) -> "RenderParams":
        """A realistic C-arm drawn at random over a wide range.

        ``distortion``: allow mild pincushion distortion (then the truth ``P`` is only
        approximately right: for training, not for pose evaluation).
        ``metal``: force a polarity ("bright"/"dark"), else 50/50.
        """
        rng = np.random.default_rng(rng)
        circle = bool(rng.random() < 0.5)
        kvp = float(rng.uniform(60.0, 125.0))
        p = cls(
            kvp=round(kvp, 1),
            filtration_mm_al=round(float(rng.uniform(2.5, 6.0)), 2),
            filtration_mm_cu=round(float(rng.choice([0.0, 0.0, 0.1, 0.2, 0.3])), 2),
            photons_per_pixel=float(np.exp(rng.uniform(np.log(200.0), np.log(2e4)))),
            electronic_noise=float(rng.uniform(0.0, 0.004)),
            scatter_fraction=float(rng.uniform(0.05, 1.2)),
            scatter_sigma=float(rng.uniform(0.06, 0.2)),
            blur_px=float(rng.uniform(0.3, 2.0)),
            heel=float(rng.uniform(-0.15, 0.15)),
            collimator=(tuple(float(x) for x in rng.uniform(0.0, 0.18, 4)) if rng.random() < 0.25 else None),
            response="log" if rng.random() < 0.8 else "linear",
            drc=float(rng.uniform(0.0, 0.6)) if rng.random() < 0.6 else 0.0,
            drc_sigma=float(rng.uniform(0.04, 0.15)),
            edge_enhance=float(rng.uniform(0.0, 1.5)) if rng.random() < 0.6 else 0.0,
            edge_sigma_px=float(rng.uniform(1.0, 4.0)),
            window_low_pct=float(rng.uniform(0.0, 3.0)),
            window_high_pct=float(rng.uniform(97.0, 100.0)),
            gamma=float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))),
            metal=metal if metal is not None else ("dark" if rng.random() < 0.5 else "bright"),
            field="circle" if circle else "square",
            field_radius=float(rng.uniform(0.44, 0.53)) if circle else 0.49,
            vignetting=float(rng.uniform(0.05, 0.45)) if circle else float(rng.uniform(0.0, 0.1)),
            pincushion=float(rng.uniform(0.0, 0.04)) if (distortion and circle and rng.random() < 0.7) else 0.0,
            bit_depth=8 if rng.random() < 0.6 else 16,
            bits_stored=None,
            burned_text=bool(rng.random() < 0.5),
            markers=bool(rng.random() < 0.4),
        )
        if p.bit_depth == 16:
            p.bits_stored = int(rng.choice([12, 14, 16]))
        return p

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["collimator"] is not None:
            d["collimator"] = list(d["collimator"])
        return d


@dataclass
class SimulatedView:
    """One rendered view.

    ``image``: uint8/uint16 ``[v, u]`` exactly as written to the case file; ``labels``: uint8
    ``[v, u]`` (0 background, 1 head, 2 shaft), warped like the image; ``metal``: the
    polarity ("bright"/"dark"); ``attenuation``: float32 ``[v, u]`` ``-log(I/I0)`` before the
    display transform (no distortion), for diagnostics; ``params``: what was used.
    """

    image: np.ndarray
    labels: np.ndarray
    metal: str
    attenuation: np.ndarray
    params: RenderParams
    view: geometry.View | None = None
    extra: dict = field(default_factory=dict)


# =============================================================================== CT line integrals
@dataclass
class PreparedCT:
    """Material densities of a CT ready for projection.

    ``data``: torch ``[C, k, j, i]`` g/cm^3 (cropped to the body), ``materials``: the C names,
    ``ijk_to_ras``: (4,4) of the cropped (and possibly downsampled) grid, ``key``: a
    fingerprint for caches. Slabs permuted for each main axis are cached on first use.
    """

    data: torch.Tensor
    materials: tuple
    ijk_to_ras: np.ndarray
    key: str
    _slabs: dict = field(default_factory=dict, repr=False)

    @property
    def device(self):
        return self.data.device

    @property
    def shape_ijk(self):
        return tuple(int(s) for s in reversed(self.data.shape[1:]))

    def slabs(self, axis: int) -> torch.Tensor:
        """``[n_axis, C, n_q, n_p]``: slices across ijk-axis ``axis``; p < q are the other two axes."""
        if axis not in self._slabs:
            dim_of = {0: 3, 1: 2, 2: 1}  # ijk axis -> dimension of data [C, k, j, i]
            p, q = [a for a in range(3) if a != axis]
            self._slabs[axis] = self.data.permute(dim_of[axis], 0, dim_of[q], dim_of[p]).contiguous()
        return self._slabs[axis]


def prepare_ct(ct, device="cpu", downsample=1, crop_threshold_g_cm3: float = 0.3,
               extend_mm: float = 0.0) -> PreparedCT:
    """Turn a CT into :class:`PreparedCT`.

    ``ct``: a :class:`PreparedCT` (returned as is), a ``ct.Volume`` of HU (split into materials
    by ``ct.material_densities``), or a dict ``{material: Volume-like}`` of densities in g/cm^3
    on one grid (Volume-like: ``.array [k,j,i]`` and ``.ijk_to_ras``).
    ``downsample``: int or (i, j, k) factors, box-averaged (faster rendering; the CT's own
    resolution is usually coarser than the rays). The grid is cropped to the voxels denser
    than ``crop_threshold_g_cm3`` (air costs time and adds nothing).
    ``extend_mm``: mirror the CT beyond its superior and inferior ends by this much (along the
    grid axis nearest to S), so that views reaching past a short scan still show a plausible
    body instead of a band of air. An approximation (mirrored anatomy); 0 = off.
    """
    if isinstance(ct, PreparedCT):
        return ct if torch.device(device) == ct.device else _to_device(ct, device)
    if isinstance(ct, dict):
        items = list(ct.items())
        if not items:
            raise ValueError("prepare_ct: empty material dict")
        A = np.asarray(items[0][1].ijk_to_ras, float)
        shape = np.asarray(items[0][1].array).shape
        for name, vol in items:
            if np.asarray(vol.array).shape != shape or not np.allclose(vol.ijk_to_ras, A, atol=1e-4):
                raise ValueError(f"prepare_ct: material {name!r} is not on the grid of {items[0][0]!r}")
        materials = tuple(n for n, _ in items)
        arrays = [np.asarray(v.array, np.float32) for _, v in items]
        src = getattr(items[0][1], "path", None)
    else:
        if not hasattr(ct, "array") or not hasattr(ct, "ijk_to_ras"):
            raise ValueError("prepare_ct: expected a ct.Volume of HU, a {material: Volume} dict or a PreparedCT")
        dens = _ct_module().material_densities(np.asarray(ct.array, np.float32))
        materials = tuple(dens)
        arrays = [np.asarray(dens[m], np.float32) for m in materials]
        A = np.asarray(ct.ijk_to_ras, float)
        shape = arrays[0].shape
        src = getattr(ct, "path", None)
    if len(shape) != 3:
        raise ValueError(f"prepare_ct: CT must be 3D [k,j,i], got shape {shape}")
    for m, a in zip(materials, arrays):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"prepare_ct: material {m!r} has NaN or infinite densities")
    key = _fingerprint(arrays, A, src)
    data = torch.from_numpy(np.stack(arrays)).to(device)
    # Crop to the body.
    mask = data.sum(0) > crop_threshold_g_cm3
    if bool(mask.any()):
        lo, hi = [], []
        for d in range(3):
            other = tuple(x for x in range(3) if x != d)
            nz = torch.nonzero(mask.any(dim=other[1]).any(dim=other[0])).flatten()
            lo.append(int(nz[0]))
            hi.append(int(nz[-1]) + 1)
        data = data[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        shift = np.eye(4)
        shift[:3, 3] = [lo[2], lo[1], lo[0]]  # (i, j, k) offset of the first kept voxel
        A = A @ shift
    if extend_mm > 0:
        cols = A[:3, :3] / np.linalg.norm(A[:3, :3], axis=0)
        ax = int(np.argmax(np.abs(cols[2])))                 # ijk axis nearest to S
        n_ax = data.shape[3 - ax]
        pad = int(min(round(extend_mm / np.linalg.norm(A[:3, ax])), n_ax - 1))
        if pad > 0:
            pads = [0] * 6                                   # (i_l, i_r, j_l, j_r, k_l, k_r)
            pads[2 * ax] = pads[2 * ax + 1] = pad
            data = F.pad(data[None], tuple(pads), mode="reflect")[0]
            shift = np.eye(4)
            shift[ax, 3] = -pad
            A = A @ shift
            key = f"{key}-ext{pad}"
    ds = (downsample,) * 3 if np.isscalar(downsample) else tuple(downsample)
    ds = tuple(max(1, int(f)) for f in ds)
    if ds != (1, 1, 1):
        fi, fj, fk = ds
        data = F.avg_pool3d(data[None], kernel_size=(fk, fj, fi), stride=(fk, fj, fi), ceil_mode=True,
                            count_include_pad=False)[0]
        # New voxel centre n sits at old (n*f + (f-1)/2).
        S = np.diag([fi, fj, fk, 1.0])
        S[:3, 3] = [(fi - 1) / 2, (fj - 1) / 2, (fk - 1) / 2]
        A = A @ S
        key = f"{key}-ds{fi}{fj}{fk}"
    return PreparedCT(data=data.contiguous(), materials=materials, ijk_to_ras=A, key=key)


def _to_device(p: PreparedCT, device) -> PreparedCT:
    return PreparedCT(data=p.data.to(device), materials=p.materials, ijk_to_ras=p.ijk_to_ras, key=p.key)


def _fingerprint(arrays, A, path) -> str:
    h = hashlib.sha1()
    h.update(np.asarray(A, np.float64).tobytes())
    h.update(str(path).encode())
    for a in arrays:
        h.update(str(a.shape).encode())
        flat = a.reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 4096)]).tobytes())
    return h.hexdigest()[:16]


def ct_line_integrals(ct_densities, view: geometry.View, device="cpu", binning: int = 1,
                      chunk_pixels: int = 2_000_000, backend: str = "torch") -> dict:
    """Areal density (g/cm^2) of each CT material along each pixel's ray: ``{material: tensor [v, u]}``.

    ``ct_densities``: anything :func:`prepare_ct` takes (prepare once and reuse for speed).
    Joseph's method: slices across the main axis of the view (in voxel units), one bilinear
    sample per slice per ray (more when the rays are steep, so the step in the other axes stays
    under a voxel), times the ray length per slice. Voxels are boxes of their spacing; values
    interpolate linearly in-slice and fall to zero beyond the volume.
    ``binning``: render ``binning`` x fewer rays per axis and upsample bilinearly (for training
    throughput; 1 = one ray per pixel centre).
    ``backend``: "torch" (default: this module's Joseph, CPU or CUDA) or "rtk" (RTK's C++
    ``JosephForwardProjectionImageFilter``, the same method, CPU only, needs ``itk-rtk``;
    ~1.5x faster per view on 2 cores and equal to NCC > 0.9999, but importing ITK/RTK costs
    ~12 s of CPU once per process: worth it for long runs only). The default stays "torch" so
    that results (and bytes) never depend on what happens to be installed.
    """
    pct = prepare_ct(ct_densities, device=device)
    if backend not in ("torch", "rtk"):
        raise ValueError(f"ct_line_integrals: backend must be 'torch' or 'rtk', got {backend!r}")
    if backend == "rtk":
        if pct.device.type != "cpu":
            raise ValueError("ct_line_integrals: the rtk backend runs on the CPU only")
        if abs(view.K[0, 1]) > 1e-9 * abs(view.K[0, 0]):
            raise ValueError("ct_line_integrals: the rtk backend needs square-grid pixels (no skew in K)")
        if not _rtk_available():
            raise ValueError("ct_line_integrals: backend 'rtk' needs the itk-rtk package (pip install itk-rtk)")
        return _rtk_line_integrals(pct, view, binning)
    W, H = int(view.width), int(view.height)
    if binning > 1:
        Wb, Hb = -(-W // binning), -(-H // binning)
        # Coarse pixel centre (u', v') is fine pixel (b u' + (b-1)/2): compose with P.
        B = np.array([[1.0 / binning, 0, -(binning - 1) / (2.0 * binning)],
                      [0, 1.0 / binning, -(binning - 1) / (2.0 * binning)], [0, 0, 1]])
        out = _joseph(pct, B @ view.P, Wb, Hb, chunk_pixels)
        out = F.interpolate(out[None], scale_factor=binning, mode="bilinear", align_corners=False)[0, :, :H, :W]
        # F.interpolate with align_corners=False maps output centre x to input (x + 0.5)/b - 0.5,
        # i.e. exactly the coarse pixel centres above.
    else:
        out = _joseph(pct, view.P, W, H, chunk_pixels)
    return {m: out[c] for c, m in enumerate(pct.materials)}


@functools.lru_cache(maxsize=1)
def _rtk_available() -> bool:
    try:
        from itk import RTK  # noqa: F401  (itk-rtk wheel)

        return hasattr(RTK, "JosephForwardProjectionImageFilter")
    except Exception:
        return False


def _rtk_line_integrals(pct: PreparedCT, view: geometry.View, binning: int = 1) -> dict:
    """CT line integrals with RTK's Joseph projector (ITK physical space is LPS)."""
    import itk
    from itk import RTK as rtk

    W, H = int(view.width), int(view.height)
    if binning > 1:
        Wb, Hb = -(-W // binning), -(-H // binning)
        B = np.array([[1.0 / binning, 0, -(binning - 1) / (2.0 * binning)],
                      [0, 1.0 / binning, -(binning - 1) / (2.0 * binning)], [0, 0, 1]])
        coarse = geometry.View.from_P(B @ view.P, Wb, Hb)
        out = _rtk_line_integrals(pct, coarse, 1)
        stack = torch.stack([out[m] for m in pct.materials])[None]
        stack = F.interpolate(stack, scale_factor=binning, mode="bilinear", align_corners=False)[0, :, :H, :W]
        return {m: stack[c] for c, m in enumerate(pct.materials)}
    lps = np.diag([-1.0, -1.0, 1.0])
    images = pct._slabs.get("rtk")
    if images is None:
        A = pct.ijk_to_ras
        spacing = np.linalg.norm(A[:3, :3], axis=0)
        direction = lps @ (A[:3, :3] / spacing)
        images = []
        for c in range(pct.data.shape[0]):
            img = itk.image_from_array(np.ascontiguousarray(pct.data[c].cpu().numpy()))
            img.SetSpacing(spacing.tolist())
            img.SetOrigin((lps @ A[:3, 3]).tolist())
            img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
            images.append(img)
        pct._slabs["rtk"] = images
    K, R = view.K, view.R
    f = abs(K[0, 0])
    sdd = 1000.0                                     # any plane works: rays are what matter
    pix = sdd / f
    u_dir = R[0] * np.sign(K[0, 0])
    v_dir = R[1]
    src = view.source_mm
    p00 = src + sdd * R[2] - K[0, 2] * pix * u_dir - K[1, 2] * pix * v_dir * (f / K[1, 1])
    pix_v = sdd / K[1, 1]
    geo = rtk.ThreeDCircularProjectionGeometry.New()
    geo.AddProjection(itk.Point[itk.D, 3]((lps @ src).tolist()), itk.Point[itk.D, 3]((lps @ p00).tolist()),
                      itk.Vector[itk.D, 3]((lps @ u_dir).tolist()), itk.Vector[itk.D, 3]((lps @ v_dir).tolist()))
    ImageType = itk.Image[itk.F, 3]
    out = {}
    for c, m in enumerate(pct.materials):
        source = rtk.ConstantImageSource[ImageType].New()
        source.SetOrigin([0.0, 0.0, 0.0])
        source.SetSpacing([pix, pix_v, 1.0])
        source.SetSize([W, H, 1])
        source.SetConstant(0.0)
        fp = rtk.JosephForwardProjectionImageFilter[ImageType, ImageType].New()
        fp.SetInput(0, source.GetOutput())
        fp.SetInput(1, images[c])
        fp.SetGeometry(geo)
        fp.SetNumberOfWorkUnits(max(1, torch.get_num_threads()))
        fp.Update()
        arr = itk.array_from_image(fp.GetOutput())[0]
        out[m] = torch.from_numpy(np.ascontiguousarray(arr, np.float32) * 0.1)   # g/cm^3 * mm -> g/cm^2
    return out


def _joseph(pct: PreparedCT, P, W: int, H: int, chunk_pixels: int) -> torch.Tensor:
    dev = pct.device
    A = pct.ijk_to_ras
    M = np.asarray(P, float) @ A                      # voxel (i, j, k, 1) -> homogeneous pixel
    M3inv = np.linalg.inv(M[:, :3])
    src = -M3inv @ M[:, 3]                            # source in voxel coordinates
    n_ijk = pct.shape_ijk
    C = pct.data.shape[0]
    # Main axis: the largest voxel-space component of the rays (checked on the field's corners).
    corners = np.array([[0, 0, 1], [W - 1, 0, 1], [0, H - 1, 1], [W - 1, H - 1, 1], [(W - 1) / 2, (H - 1) / 2, 1]], float)
    dc = corners @ M3inv.T
    axis = int(np.argmax(np.abs(dc[-1])))
    p_ax, q_ax = [a for a in range(3) if a != axis]
    if np.any(np.sign(dc[:, axis]) != np.sign(dc[-1, axis])) or np.any(dc[:, axis] == 0):
        raise ValueError("ct_line_integrals: the view's field spans more than 180 degrees along one CT axis")
    ratio = float(np.max(np.abs(dc[:, [p_ax, q_ax]] / dc[:, [axis]])))
    substeps = max(1, int(math.ceil(ratio - 1e-6)))
    n_a = n_ijk[axis]
    # Slices behind the source carry nothing.
    sgn = np.sign(dc[-1, axis])
    s_all = np.arange(n_a, dtype=np.float64)
    if sgn > 0:
        keep = s_all > src[axis]
    else:
        keep = s_all < src[axis]
    if not keep.any():
        return torch.zeros((C, H, W), device=dev)
    s_lo, s_hi = int(s_all[keep][0]), int(s_all[keep][-1])
    if (sgn > 0 and src[axis] > -0.5) or (sgn < 0 and src[axis] < n_a - 0.5):
        raise ValueError("ct_line_integrals: the X-ray source lies inside the CT volume")

    # Per pixel: ray crossing of slice s at (p, q) = base + s * grad (voxel units).
    uu = torch.arange(W, dtype=torch.float64, device=dev)
    vv = torch.arange(H, dtype=torch.float64, device=dev)
    Mi = torch.as_tensor(M3inv, dtype=torch.float64, device=dev)
    d = (Mi[:, 0, None, None] * uu[None, None, :] + Mi[:, 1, None, None] * vv[None, :, None]
         + Mi[:, 2, None, None])                           # [3, H, W] voxel-space directions
    grad = torch.stack([d[p_ax] / d[axis], d[q_ax] / d[axis]], dim=-1)     # [H, W, 2]
    srct = torch.as_tensor(src, dtype=torch.float64, device=dev)
    base = torch.stack([srct[p_ax] - srct[axis] * grad[..., 0], srct[q_ax] - srct[axis] * grad[..., 1]], -1)
    # mm of ray per unit step along the main axis
    A3 = torch.as_tensor(A[:3, :3], dtype=torch.float64, device=dev)
    step_mm = torch.linalg.norm(torch.einsum("rc,chw->rhw", A3, d / d[axis]), dim=0)
    # grid_sample normalisation (align_corners=True): index x -> 2 x / (n - 1) - 1.
    n_p, n_q = n_ijk[p_ax], n_ijk[q_ax]
    sc = torch.tensor([2.0 / max(n_p - 1, 1), 2.0 / max(n_q - 1, 1)], dtype=torch.float64, device=dev)
    g0 = (base * sc - 1.0).to(torch.float32)[None]         # [1, H, W, 2]
    gd = (grad * sc).to(torch.float32)[None]
    slabs = pct.slabs(axis)                                 # [n_a, C, n_q, n_p]
    acc = torch.zeros((C, H, W), dtype=torch.float32, device=dev)
    chunk = max(1, int(chunk_pixels // (H * W)))
    buf = torch.empty((chunk, H, W, 2), dtype=torch.float32, device=dev)
    for sub in range(substeps):
        f = sub / substeps
        for a in range(s_lo, s_hi + 1, chunk):
            b = min(s_hi + 1, a + chunk)
            n = b - a
            s = torch.arange(a, b, dtype=torch.float32, device=dev).view(-1, 1, 1, 1) + f
            grid = buf[:n]
            torch.mul(s, gd, out=grid)
            grid.add_(g0)
            samp = F.grid_sample(slabs[a:b], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            if f == 0:
                acc += samp.sum(0)
            else:
                acc += (1 - f) * samp.sum(0)
                b2 = min(b + 1, n_a)
                nxt = slabs[a + 1:b2]
                samp2 = F.grid_sample(nxt, grid[: len(nxt)], mode="bilinear", padding_mode="zeros", align_corners=True)
                acc += f * samp2.sum(0)
    # density (g/cm^3) x mm -> g/cm^2
    return acc * (step_mm.to(torch.float32) * (0.1 / substeps))[None]


# =============================================================================== screws
@functools.lru_cache(maxsize=128)
def _screw_parts(spec, voxel_mm: float, device: str):
    """Head and shaft sub-volumes cropped to their material: list of (name, tensor [1,1,Z,Y,X], origin xyz, h)."""
    from . import screw as screw_mod

    sv = screw_mod.attenuation_volume(spec, voxel_mm)
    parts = []
    for name, arr in (("head", sv.head), ("shaft", sv.shaft)):
        nz = np.nonzero(arr > 0)
        if len(nz[0]) == 0:
            continue
        lo = [max(0, int(x.min()) - 1) for x in nz]
        hi = [min(arr.shape[d], int(nz[d].max()) + 2) for d in range(3)]
        sub = np.ascontiguousarray(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.float32)
        origin = np.asarray(sv.origin_mm, float) + sv.voxel_mm * np.array([lo[2], lo[1], lo[0]], float)
        t = torch.from_numpy(sub.copy()).to(device)
        # The same volume as a one-material "CT" in the screw frame (voxel (i,j,k) -> screw mm).
        A = np.diag([sv.voxel_mm, sv.voxel_mm, sv.voxel_mm, 1.0])
        A[:3, 3] = origin
        pct = PreparedCT(data=t[None], materials=("fraction",), ijk_to_ras=A, key=f"{spec}-{name}")
        parts.append((name, t[None, None], origin, float(sv.voxel_mm), pct))
    return parts


def screw_path_lengths(screws, view: geometry.View, device="cpu", voxel_mm: float = 0.25,
                       method: str = "auto", step_fraction: float = 0.5, max_samples: int = 4_000_000):
    """Titanium path length (mm) per pixel: ``(head_mm [v, u], shaft_mm [v, u])`` float32 tensors.

    Each screw's attenuation volume (titanium fraction per ``voxel_mm`` voxel, screw frame;
    head and shaft cropped to their material) is integrated along the rays of the pixels inside
    its projected box only. ``method``: "joseph" (as :func:`ct_line_integrals`: one bilinear
    sample per voxel slice across the rays' main axis), "march" (trilinear samples from where
    each ray enters the box to where it leaves, at steps of ``step_fraction * voxel_mm`` or
    less), or "auto" (default: march for a screw seen end-on, within ~21 deg of its axis, where
    clipping each ray to the box saves most; Joseph otherwise, ~3x faster there). They agree to
    NCC > 0.9999 and both conserve the titanium volume. Overlapping screws add up.
    """
    if method not in ("joseph", "march", "auto"):
        raise ValueError(f"screw_path_lengths: method must be 'auto', 'joseph' or 'march', got {method!r}")
    W, H = int(view.width), int(view.height)
    head = torch.zeros((H, W), dtype=torch.float32, device=device)
    shaft = torch.zeros((H, W), dtype=torch.float32, device=device)
    P = np.asarray(view.P, float)
    src_w = geometry.source_position(P)
    P3inv = np.linalg.inv(P[:, :3])
    for s in screws:
        T = np.asarray(s.T_world_from_screw, float)
        Rws, tws = T[:3, :3], T[:3, 3]
        for name, vol, origin, h, pct in _screw_parts(s.spec, float(voxel_mm), str(torch.device(device))):
            shape_xyz = np.array(vol.shape[:1:-1], float)          # (X, Y, Z)
            lo = origin - 0.5 * h
            hi = origin + (shape_xyz - 0.5) * h
            box = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            bw = box @ Rws.T + tws
            if np.any(geometry.depth(P, bw) <= 0):
                raise ValueError(f"screw {s.id}: lies behind the X-ray source of view {view.name!r}")
            uv = geometry.project(P, bw)
            u0, v0 = max(0, int(np.floor(uv[:, 0].min()))), max(0, int(np.floor(uv[:, 1].min())))
            u1, v1 = min(W - 1, int(np.ceil(uv[:, 0].max()))), min(H - 1, int(np.ceil(uv[:, 1].max())))
            if u1 < u0 or v1 < v0:
                continue
            target = head if name == "head" else shaft
            use = method
            if use == "auto":
                centre = bw.mean(axis=0)
                ray = (centre - src_w) / np.linalg.norm(centre - src_w)
                use = "march" if abs(float(ray @ Rws[:, 2])) > 0.93 else "joseph"
            if use == "joseph":
                # The pixel window as its own view: P of the window, volume grid in world via T.
                Pw = np.array([[1.0, 0, -u0], [0, 1.0, -v0], [0, 0, 1]]) @ P
                win = PreparedCT(data=pct.data, materials=pct.materials, ijk_to_ras=T @ pct.ijk_to_ras,
                                 key=pct.key, _slabs=pct._slabs)
                vals = _joseph(win, Pw, u1 - u0 + 1, v1 - v0 + 1, 2_000_000)[0] * 10.0   # fraction*cm -> mm
            else:
                vals = _march_box(vol, origin, h, lo, hi, Rws, tws, src_w, P3inv, u0, u1, v0, v1,
                                  step_fraction * h, max_samples, device)
            target[v0:v1 + 1, u0:u1 + 1] += vals
    return head, shaft


def _march_box(vol, origin, h, lo, hi, Rws, tws, src_w, P3inv, u0, u1, v0, v1, step, max_samples, device):
    """Integrate a [1,1,Z,Y,X] fraction volume (screw frame) along pixel rays of a pixel box; mm.

    Each ray is clipped to the volume's box and sampled at N >= chord / step midpoints at its
    own step chord / N (no samples are spent outside the box).
    """
    dev = torch.device(device)
    nu, nv = u1 - u0 + 1, v1 - v0 + 1
    uu, vv = np.meshgrid(np.arange(u0, u1 + 1, dtype=float), np.arange(v0, v1 + 1, dtype=float))
    hpix = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], axis=1)
    d_w = hpix @ P3inv.T
    d_w /= np.linalg.norm(d_w, axis=1, keepdims=True)
    o = Rws.T @ (src_w - tws)                         # source in the screw frame
    d = d_w @ Rws                                     # unit ray directions in the screw frame
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(np.abs(d) > 1e-12, 1.0 / np.where(np.abs(d) > 1e-12, d, 1.0), 1e12)
    t0 = (lo[None] - o[None]) * inv
    t1 = (hi[None] - o[None]) * inv
    tmin = np.maximum(np.minimum(t0, t1).max(axis=1), 0.0)
    tmax = np.maximum(t0, t1).min(axis=1)
    chord = tmax - tmin
    idx = np.nonzero(chord > 1e-6)[0]
    out = torch.zeros(nu * nv, dtype=torch.float32, device=dev)
    if len(idx) == 0:
        return out.view(nv, nu)
    # Rays are grouped by sample count (geometric buckets, 12 % apart); a ray of bucket N takes
    # N midpoint samples at its own step chord/N <= step: regular [rays, N] grids, no waste.
    need = np.maximum(np.ceil(chord[idx] / step), 1.0)
    bucket = np.ceil(1.12 ** np.ceil(np.log(need) / np.log(1.12))).astype(np.int64)
    bucket = np.maximum(bucket, need.astype(np.int64))
    dt = chord[idx] / bucket
    size_xyz = np.array(vol.shape[:1:-1], float)
    scale = 2.0 / np.maximum(size_xyz - 1, 1)
    first = o[None] + (tmin[idx] + 0.5 * dt)[:, None] * d[idx]
    a_n = ((first - origin[None]) / h * scale[None] - 1.0).astype(np.float32)
    b_n = ((dt[:, None] * d[idx]) / h * scale[None]).astype(np.float32)
    acc = np.zeros(len(idx), np.float32)
    for nb in np.unique(bucket):
        sel = np.nonzero(bucket == nb)[0]
        rays_per_chunk = max(1, int(max_samples // nb))
        for c0 in range(0, len(sel), rays_per_chunk):
            part = sel[c0:c0 + rays_per_chunk]
            a_t = torch.from_numpy(a_n[part]).to(dev)
            b_t = torch.from_numpy(b_n[part]).to(dev)
            k = torch.arange(int(nb), dtype=torch.float32, device=dev)
            g = a_t[:, None, :] + k[None, :, None] * b_t[:, None, :]          # [rays, nb, 3]
            val = F.grid_sample(vol, g[None, None], mode="bilinear", padding_mode="zeros",
                                align_corners=True)                           # [1, 1, 1, rays, nb]
            acc[part] = val[0, 0, 0].sum(-1).cpu().numpy()
    acc = torch.from_numpy(acc * dt.astype(np.float32)).to(dev)
    out[torch.as_tensor(idx, device=dev)] = acc
    return out.view(nv, nu)


def labels_from_path_lengths(head_mm, shaft_mm, threshold_mm: float = LABEL_THRESHOLD_MM) -> np.ndarray:
    """CASE_FORMAT rule: 1 (head) where any head material is on the ray, else 2 (shaft), else 0."""
    head_mm = torch.as_tensor(head_mm)
    shaft_mm = torch.as_tensor(shaft_mm)
    lab = torch.zeros(head_mm.shape, dtype=torch.uint8, device=head_mm.device)
    lab[shaft_mm > threshold_mm] = 2
    lab[head_mm > threshold_mm] = 1
    return lab.cpu().numpy()


def label_map(screws, view: geometry.View, device="cpu", threshold_mm: float = LABEL_THRESHOLD_MM) -> np.ndarray:
    """uint8 ``[v, u]``: 0 background, 1 head, 2 shaft (a pixel is head if any head material lies
    on its ray, else shaft if any shaft material does; "any" = more than ``threshold_mm``)."""
    head, shaft = screw_path_lengths(screws, view, device=device)
    return labels_from_path_lengths(head, shaft, threshold_mm)


# =============================================================================== distractors
@dataclass
class Distractor:
    """Metal (or other material) that is not a screw, as an analytic shape in world RAS mm.

    ``shape``: "cylinder" (``p0``, ``p1``, ``radius_mm``), "sphere" (``p0`` centre,
    ``radius_mm``) or "box" (``p0`` centre, ``axes`` 3x3 rows = unit box axes in world,
    ``half_mm`` half sizes). ``material``: a name known to ``ct.mass_attenuation_cm2_g``;
    ``density_g_cm3`` defaults to that material's density. ``kind``: what it stands for.
    """

    kind: str
    shape: str
    material: str
    p0: np.ndarray
    p1: np.ndarray | None = None
    radius_mm: float = 0.0
    axes: np.ndarray | None = None
    half_mm: np.ndarray | None = None
    density_g_cm3: float | None = None


def distractor_line_integrals(distractors, view: geometry.View, device="cpu") -> dict:
    """Areal density (g/cm^2) per material of the distractors along each pixel ray: ``{material: [v, u]}``.

    Exact chords: sphere and finite cylinder by their quadratic, box by slabs.
    """
    out: dict = {}
    if not distractors:
        return out
    W, H = int(view.width), int(view.height)
    P = np.asarray(view.P, float)
    src = torch.as_tensor(geometry.source_position(P), dtype=torch.float64, device=device)
    P3inv = torch.as_tensor(np.linalg.inv(P[:, :3]), dtype=torch.float64, device=device)
    vv, uu = torch.meshgrid(torch.arange(H, dtype=torch.float64, device=device),
                            torch.arange(W, dtype=torch.float64, device=device), indexing="ij")
    hp = torch.stack([uu, vv, torch.ones_like(uu)], -1)
    d = hp @ P3inv.T
    d = d / torch.linalg.norm(d, dim=-1, keepdim=True)         # [H, W, 3] unit ray directions
    for dis in distractors:
        L = _chord(dis, src, d)
        rho = dis.density_g_cm3 if dis.density_g_cm3 is not None else _density(dis.material)
        val = (L * (rho * 0.1)).to(torch.float32)
        out[dis.material] = out[dis.material] + val if dis.material in out else val
    return out


def _chord(dis: Distractor, o, d):
    """Length (mm) inside one shape of the rays o + t d (t >= 0), ``d`` [H, W, 3] unit."""
    dev = d.device
    p0 = torch.as_tensor(np.asarray(dis.p0, float), dtype=torch.float64, device=dev)
    if dis.shape == "sphere":
        oc = o - p0
        b = d @ oc
        c = oc @ oc - dis.radius_mm ** 2
        disc = b * b - c
        root = torch.sqrt(torch.clamp(disc, min=0))
        t0 = torch.clamp(-b - root, min=0)
        t1 = torch.clamp(-b + root, min=0)
        return torch.where(disc > 0, t1 - t0, torch.zeros_like(b))
    if dis.shape == "cylinder":
        p1 = torch.as_tensor(np.asarray(dis.p1, float), dtype=torch.float64, device=dev)
        axis = p1 - p0
        length = torch.linalg.norm(axis)
        a = axis / length
        oc = o - p0
        da = d @ a                                           # [H, W]
        oa = oc @ a
        dp = d - da[..., None] * a                           # ray direction perpendicular to the axis
        op = oc - oa * a
        qa = (dp * dp).sum(-1)
        qb = 2 * (dp @ op)
        qc = op @ op - dis.radius_mm ** 2
        disc = qb * qb - 4 * qa * qc
        ok = (disc > 0) & (qa > 1e-12)
        root = torch.sqrt(torch.clamp(disc, min=0))
        qa_s = torch.where(qa > 1e-12, qa, torch.ones_like(qa))
        t0 = (-qb - root) / (2 * qa_s)
        t1 = (-qb + root) / (2 * qa_s)
        # Clip by the caps: oa + t da within [0, length].
        da_s = torch.where(da.abs() > 1e-12, da, torch.full_like(da, 1e-12))
        s0 = (0 - oa) / da_s
        s1 = (length - oa) / da_s
        smin, smax = torch.minimum(s0, s1), torch.maximum(s0, s1)
        par = da.abs() <= 1e-12          # ray parallel to the caps: inside the slab or not at all
        inside_slab = (oa >= 0) & (oa <= length)
        smin = torch.where(par, torch.where(inside_slab, torch.full_like(smin, -1e18), torch.full_like(smin, 1e18)), smin)
        smax = torch.where(par, torch.where(inside_slab, torch.full_like(smax, 1e18), torch.full_like(smax, -1e18)), smax)
        a0 = torch.clamp(torch.maximum(t0, smin), min=0)
        a1 = torch.minimum(t1, smax)
        return torch.where(ok, torch.clamp(a1 - a0, min=0), torch.zeros_like(qa))
    if dis.shape == "box":
        Ax = torch.as_tensor(np.asarray(dis.axes, float), dtype=torch.float64, device=dev)  # rows: box axes
        half = torch.as_tensor(np.asarray(dis.half_mm, float), dtype=torch.float64, device=dev)
        ol = Ax @ (o - p0)
        dl = d @ Ax.T
        dl_s = torch.where(dl.abs() > 1e-12, dl, torch.full_like(dl, 1e-12))
        t0 = (-half - ol) / dl_s
        t1 = (half - ol) / dl_s
        tmin = torch.clamp(torch.minimum(t0, t1).amax(-1), min=0)
        tmax = torch.maximum(t0, t1).amin(-1)
        return torch.clamp(tmax - tmin, min=0)
    raise ValueError(f"Distractor {dis.kind!r}: unknown shape {dis.shape!r} (cylinder, sphere, box)")


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rand_dir(rng, mean, spread_deg):
    """A unit vector within about ``spread_deg`` of ``mean``."""
    m = _unit(mean)
    ref = np.array([1.0, 0, 0]) if abs(m[0]) < 0.9 else np.array([0, 1.0, 0])
    a = _unit(np.cross(m, ref))
    b = np.cross(m, a)
    ang = np.deg2rad(spread_deg) * np.sqrt(rng.random())
    phi = rng.uniform(0, 2 * np.pi)
    return _unit(np.cos(ang) * m + np.sin(ang) * (np.cos(phi) * a + np.sin(phi) * b))


def random_distractors(rng, center_mm, screws=(), n: int | None = None, kinds=None) -> list:
    """Random non-screw objects around ``center_mm`` (world RAS mm; e.g. the spine at the isocentre).

    Kinds: "kwire" (steel, 1-2.5 mm, often along a pedicle), "rod" (titanium 5.5 mm rod, through
    the heads of one side's screws when ``screws`` are given), "probe" (steel instrument shaft),
    "retractor" (steel blade), "clamp" (steel jaws), "ecg" (electrode snap + lead), "table"
    (table top and rails), "beads" (calibration phantom: steel spheres on a grid), "clip".
    """
    rng = np.random.default_rng(rng)
    c = np.asarray(center_mm, float)
    all_kinds = ["kwire", "rod", "probe", "retractor", "clamp", "ecg", "table", "beads", "clip"]
    kinds = list(kinds) if kinds is not None else all_kinds
    if n is None:
        n = int(rng.integers(0, 5))
    out: list = []
    R, A, S = np.eye(3)
    screws = list(screws)
    for _ in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "kwire":
            if screws and rng.random() < 0.5:
                s = screws[int(rng.integers(len(screws)))]
                ax = _unit(s.axis + rng.normal(0, 0.08, 3))
                tip = s.tip_mm + ax * rng.uniform(-15, 5) + rng.normal(0, 3, 3)
            else:
                ax = _rand_dir(rng, A, 50)
                tip = c + rng.normal(0, [40, 30, 60])
            length = rng.uniform(80, 250)
            out.append(Distractor("kwire", "cylinder", "steel", tip - ax * length, tip,
                                  radius_mm=float(rng.uniform(0.5, 1.25))))
        elif kind == "rod":
            sides = {}
            for s in screws:
                sides.setdefault(s.side, []).append(s)
            grp = list(sides.values())[int(rng.integers(len(sides)))] if sides else []
            if len(grp) >= 2:
                # Rod through the head centres (the tulip's slot) of this side's screws.
                heads = np.array([s.entry_mm - s.axis * 0.6 * s.spec.head_height_mm for s in grp])
                order = np.argsort(heads[:, 2])
                heads = heads[order]
                ext = rng.uniform(5, 15)
                a0 = heads[0] - _unit(heads[-1] - heads[0]) * ext
                a1 = heads[-1] + _unit(heads[-1] - heads[0]) * ext
            else:
                a0 = c + np.array([rng.uniform(-30, 30), -rng.uniform(30, 60), -rng.uniform(20, 80)])
                a1 = a0 + _rand_dir(rng, S, 10) * rng.uniform(40, 160)
            out.append(Distractor("rod", "cylinder", "titanium", a0, a1, radius_mm=2.75))
        elif kind == "probe":
            ax = _rand_dir(rng, A, 35)
            tip = c + rng.normal(0, [30, 20, 50])
            out.append(Distractor("probe", "cylinder", "steel", tip - ax * rng.uniform(100, 200), tip,
                                  radius_mm=float(rng.uniform(1.5, 3.5))))
        elif kind == "retractor":
            nrm = _rand_dir(rng, R, 25)
            up = _unit(np.cross(nrm, S)) if rng.random() < 0.5 else S
            up = _unit(up - (up @ nrm) * nrm)
            third = np.cross(nrm, up)
            centre = c + np.array([rng.choice([-1, 1]) * rng.uniform(15, 60), -rng.uniform(20, 80), rng.normal(0, 40)])
            # The blade goes from the wound (posterior) in; axes: thickness, width, depth (mostly along A).
            depth_dir = _unit(_rand_dir(rng, A, 25) - (_rand_dir(rng, A, 25) @ nrm) * nrm)
            width_dir = _unit(np.cross(nrm, depth_dir))
            axes = np.stack([nrm, width_dir, depth_dir])
            out.append(Distractor("retractor", "box", "steel", centre, axes=axes,
                                  half_mm=np.array([rng.uniform(0.6, 1.5), rng.uniform(8, 25), rng.uniform(30, 70)])))
            del third
        elif kind == "clamp":
            centre = c + rng.normal(0, [40, 30, 60]) - np.array([0, 40, 0])
            ax = _rand_dir(rng, rng.normal(0, 1, 3), 90)
            perp = _unit(np.cross(ax, _rand_dir(rng, [1, 1, 1], 90)))
            gap = rng.uniform(2, 8)
            for sgn in (-1, 1):
                p0 = centre + sgn * gap * perp
                out.append(Distractor("clamp", "cylinder", "steel", p0, p0 + ax * rng.uniform(40, 120),
                                      radius_mm=float(rng.uniform(1.5, 3.0))))
        elif kind == "ecg":
            # Electrode on the skin (anterior or posterior), lead running off in a random walk.
            skin = c + np.array([rng.uniform(-120, 120), rng.choice([-1, 1]) * rng.uniform(90, 140), rng.uniform(-120, 120)])
            out.append(Distractor("ecg", "cylinder", "steel", skin, skin + np.array([0, 2.0, 0]),
                                  radius_mm=float(rng.uniform(2.0, 4.0))))
            p = skin.copy()
            heading = _unit(np.array([rng.normal(), 0, rng.normal()]))
            for _ in range(int(rng.integers(6, 16))):
                heading = _unit(heading + rng.normal(0, 0.4, 3) * np.array([1, 0.1, 1]))
                q = p + heading * rng.uniform(10, 25)
                out.append(Distractor("ecg", "cylinder", "steel", p, q, radius_mm=float(rng.uniform(0.2, 0.45))))
                p = q
        elif kind == "table":
            y = c[1] - rng.uniform(110, 170)               # posterior to the patient
            half = np.array([rng.uniform(220, 280), rng.uniform(8, 25), 600.0])
            out.append(Distractor("table", "box", "soft", np.array([c[0], y - half[1], c[2]]), axes=np.eye(3),
                                  half_mm=half, density_g_cm3=float(rng.uniform(0.3, 0.9))))
            for sgn in (-1, 1):
                out.append(Distractor("table", "box", "steel",
                                      np.array([c[0] + sgn * (half[0] + 5), y - half[1], c[2]]), axes=np.eye(3),
                                      half_mm=np.array([rng.uniform(3, 8), rng.uniform(10, 20), 600.0])))
        elif kind == "beads":
            # A flat phantom of steel beads (a grid, some rows skipped), in front of the detector or source.
            nrm = _rand_dir(rng, A if rng.random() < 0.5 else R, 20)
            a = _unit(np.cross(nrm, S if abs(nrm[2]) < 0.9 else R))
            b = np.cross(nrm, a)
            off = rng.choice([-1, 1]) * rng.uniform(100, 200)
            centre = c + nrm * off + rng.normal(0, 20, 3)
            pitch = rng.uniform(8, 20)
            m = int(rng.integers(4, 9))
            r_mm = float(rng.uniform(0.75, 2.0))
            for i in range(m):
                for j in range(m):
                    if rng.random() < 0.15:
                        continue
                    pos = centre + (i - (m - 1) / 2) * pitch * a + (j - (m - 1) / 2) * pitch * b
                    out.append(Distractor("beads", "sphere", "steel", pos, radius_mm=r_mm))
        elif kind == "clip":
            centre = c + rng.normal(0, [60, 40, 80])
            ax = _rand_dir(rng, rng.normal(0, 1, 3), 90)
            out.append(Distractor("clip", "cylinder", "steel", centre, centre + ax * rng.uniform(4, 12),
                                  radius_mm=float(rng.uniform(0.3, 0.8))))
        else:
            raise ValueError(f"random_distractors: unknown kind {kind!r}; known: {all_kinds}")
    return out


def add_distractors(line_integrals: dict, view: geometry.View, rng, center_mm=None, screws=(), n=None,
                    device="cpu") -> tuple[dict, list]:
    """Add random distractors to ``{material: g/cm^2 [v, u]}`` (a new dict); returns (dict, distractors).

    ``center_mm``: where to put them (default: the world point on the view's central ray
    closest to the screws' centroid, or the point 60 % of the way from source to detector).
    """
    if center_mm is None:
        if screws:
            center_mm = np.mean([s.entry_mm for s in screws], axis=0)
        else:
            src, dirs = geometry.backproject(view.P, [(view.width - 1) / 2, (view.height - 1) / 2])
            center_mm = src + dirs * 600.0     # a typical source-to-isocentre distance
    dis = random_distractors(rng, center_mm, screws=screws, n=n)
    extra = distractor_line_integrals(dis, view, device=device)
    out = dict(line_integrals)
    for m, v in extra.items():
        out[m] = out[m] + v if m in out else v
    return out, dis


# =============================================================================== physics
@functools.lru_cache(maxsize=512)
def _spectrum_cached(kvp: float, al_mm: float, cu_mm: float, n_bins: int):
    import spekpy

    s = spekpy.Spek(kvp=kvp, th=12, dk=1.0)
    if al_mm > 0:
        s.filter("Al", al_mm)
    if cu_mm > 0:
        s.filter("Cu", cu_mm)
    k, phi = s.get_spectrum()
    k = np.asarray(k, float)
    phi = np.clip(np.asarray(phi, float), 0, None)
    keep = (phi > 0) & (k >= 10.0)
    k, phi = k[keep], phi[keep]
    edges = np.linspace(k[0] - 0.5, k[-1] + 0.5, n_bins + 1)
    which = np.clip(np.digitize(k, edges) - 1, 0, n_bins - 1)
    e_out, w_out = [], []
    for b in range(n_bins):
        m = which == b
        if phi[m].sum() > 0:
            e_out.append(float((k[m] * phi[m]).sum() / phi[m].sum()))
            w_out.append(float(phi[m].sum()))
    w = np.asarray(w_out)
    return np.asarray(e_out), w / w.sum()


def spectrum(kvp: float, filtration_mm_al: float = 3.0, filtration_mm_cu: float = 0.0, n_bins: int = 12):
    """Photon spectrum of an X-ray tube (``spekpy``, tungsten anode, 12 deg): ``(energies_keV, fractions)``.

    Binned to ``n_bins`` energies (fluence-weighted mean energy per bin; fractions sum to 1).
    Cached per (kVp to 0.5 kV, filtration to 0.05 mm, bins).
    """
    return _spectrum_cached(round(float(kvp) * 2) / 2, round(float(filtration_mm_al) * 20) / 20,
                            round(float(filtration_mm_cu) * 20) / 20, int(n_bins))


@functools.lru_cache(maxsize=4096)
def _mu_cached(material: str, energies: tuple) -> np.ndarray:
    return np.asarray(_ct_module().mass_attenuation_cm2_g(material, np.asarray(energies, float)), float)


def mass_attenuation(material: str, energies_keV) -> np.ndarray:
    """Mass attenuation coefficient (cm^2/g) of a material at energies (keV), from ``ct.mass_attenuation_cm2_g``."""
    return _mu_cached(material, tuple(float(e) for e in np.atleast_1d(energies_keV)))


def detect(line_integrals: dict, params: RenderParams, rng=None, device=None):
    """Detected intensity ``I / I0`` (float32 tensor [v, u]) of an energy-integrating detector.

    ``line_integrals``: ``{material: g/cm^2 [v, u]}`` (CT materials, "titanium", "steel", ...).
    ``I = sum_E N(E) E exp(-sum_m mu_m(E) L_m)`` over the spectrum, over the unattenuated value;
    plus scatter (``scatter_fraction`` x the primary blurred over ``scatter_sigma`` of the width),
    anode heel and collimator shutters; quantum noise (Gaussian with the compound-Poisson variance
    of ``photons_per_pixel`` photons) and read noise; then a Gaussian PSF (``blur_px``).
    """
    rng = np.random.default_rng(rng)
    mats = list(line_integrals)
    if not mats:
        raise ValueError("detect: no line integrals given")
    first = line_integrals[mats[0]]
    dev = first.device if device is None else torch.device(device)
    H, W = first.shape
    if params.monochromatic_kev is not None:
        E = np.array([float(params.monochromatic_kev)])
        n_E = np.array([1.0])
    else:
        E, n_E = spectrum(params.kvp, params.filtration_mm_al, params.filtration_mm_cu, params.n_energy_bins)
    mu = np.stack([mass_attenuation(m, E) for m in mats], axis=1)          # [E, M] cm^2/g
    L = torch.stack([line_integrals[m].to(dev, torch.float32) for m in mats])  # [M, H, W]
    expo = torch.einsum("em,mhw->ehw", torch.as_tensor(mu, dtype=torch.float32, device=dev), L)
    T = torch.exp(-expo)                                                   # [E, H, W]
    wE = torch.as_tensor(n_E * E, dtype=torch.float32, device=dev)
    wE2 = torch.as_tensor(n_E * E * E, dtype=torch.float32, device=dev)
    S0 = float((n_E * E).sum())
    signal = torch.einsum("e,ehw->hw", wE, T) / S0                        # primary, relative
    second = torch.einsum("e,ehw->hw", wE2, T) / S0 ** 2                  # per-photon variance term
    # Field non-uniformity: anode heel (linear ramp along u) and collimator shutters.
    gain = torch.ones((H, W), dtype=torch.float32, device=dev)
    if params.heel:
        ramp = torch.linspace(-0.5, 0.5, W, device=dev)[None, :]
        gain = gain * (1 + params.heel * ramp)
    if params.collimator is not None:
        open_ = torch.from_numpy(unshuttered_mask(W, H, params)).to(dev)
        shut = torch.where(open_, 1.0, float(params.collimator_transmission)).to(torch.float32)
        shut = _gauss_blur(shut, 1.5)
        gain = gain * shut
    signal = signal * gain
    second = second * gain
    total = signal
    if params.scatter_fraction > 0:
        scat = params.scatter_fraction * _gauss_blur(signal, params.scatter_sigma * W)
        total = signal + scat
        second = second * (1 + scat / torch.clamp(signal, min=1e-6))
    floor = 1e-6
    if params.photons_per_pixel is not None:
        # Automatic exposure control: the dose is set so that the median pixel of the central
        # field detects ``photons_per_pixel`` photons; N0 is then the unattenuated count.
        centre = total[H // 4: H - H // 4, W // 4: W - W // 4]
        med = float(torch.median(centre.reshape(-1)[:: max(1, centre.numel() // 50_000)]))
        N0 = float(params.photons_per_pixel) / max(med, 1e-6)
        std = torch.sqrt(torch.clamp(second, min=0) / N0)
        noise = torch.from_numpy(rng.standard_normal((H, W)).astype(np.float32)).to(dev)
        total = total + std * noise
        floor = 0.3 / N0      # under a third of a photon: the Gaussian approximation is over
    if params.electronic_noise > 0:
        noise = torch.from_numpy(rng.standard_normal((H, W)).astype(np.float32)).to(dev)
        total = total + params.electronic_noise * noise
    total = torch.clamp(total, min=floor)
    if params.blur_px > 0:
        total = _gauss_blur(total, params.blur_px)
    return torch.clamp(total, min=floor)


def _gauss_blur(img, sigma_px: float):
    """Separable Gaussian blur of a [H, W] tensor (reflect padding)."""
    if sigma_px <= 0.05:
        return img
    H, W = img.shape
    # Very wide kernels (scatter): blur a downsampled copy, same result to well under a percent.
    factor = 1
    while sigma_px / factor > 12 and min(H, W) // (factor * 2) >= 16:
        factor *= 2
    x = img[None, None]
    if factor > 1:
        x = F.avg_pool2d(x, factor, ceil_mode=True)
    s = sigma_px / factor
    r = int(math.ceil(3 * s))
    h_, w_ = x.shape[-2:]
    r = min(r, h_ - 1, w_ - 1)
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=img.device)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = k / k.sum()
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    if factor > 1:
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    return x[0, 0]


# =============================================================================== display
def field_mask(width: int, height: int, params: RenderParams) -> np.ndarray:
    """bool [v, u]: pixels inside the detector's field (circle for an image intensifier)."""
    if params.field == "square":
        return np.ones((height, width), bool)
    vv, uu = np.mgrid[0:height, 0:width]
    r = np.hypot(uu - (width - 1) / 2, vv - (height - 1) / 2)
    return r <= params.field_radius * width


def unshuttered_mask(width: int, height: int, params: RenderParams, as_displayed: bool = False) -> np.ndarray:
    """bool [v, u]: pixels not behind a collimator shutter (all True without shutters).

    On the detector by default; ``as_displayed``: warped by the display's pincushion distortion,
    as :func:`display` warps the image and its labels.
    """
    out = np.ones((height, width), bool)
    if params.collimator is None:
        return out
    le, to, ri, bo = params.collimator
    out[:, : int(le * width)] = False
    out[: int(to * height), :] = False
    if ri > 0:
        out[:, width - int(ri * width):] = False
    if bo > 0:
        out[height - int(bo * height):, :] = False
    if as_displayed and params.pincushion > 0:
        out = _pincushion(np.zeros((height, width), np.float32), out.astype(np.uint8), params.pincushion)[1] > 0
    return out


def display(intensity, params: RenderParams, rng=None, labels=None, exclude=None):
    """Detected ``I/I0`` [v, u] -> ``(image uint8/uint16 [v, u], labels warped alike or None)``.

    Response ``-log(I/I0)`` (or ``1 - I/I0``), window between percentiles of the field, gamma,
    polarity, vignetting, circular field with a black surround, pincushion distortion,
    burned-in text and markers, quantisation. Labels outside the field (the black surround of an
    image intensifier) become background: no screw can be seen there. ``exclude``: bool [v, u] of pixels the window
    ignores (metal: as on real consoles, anatomy sets the brightness and metal saturates).
    """
    rng = np.random.default_rng(rng)
    I = torch.as_tensor(intensity, dtype=torch.float32)
    H, W = I.shape
    x = -torch.log(I) if params.response == "log" else 1.0 - I
    # Image processing of C-arm consoles: dynamic range compression and edge enhancement.
    if params.drc > 0:
        x = x - params.drc * _gauss_blur(x, params.drc_sigma * W)
    if params.edge_enhance > 0:
        x = x + params.edge_enhance * (x - _gauss_blur(x, params.edge_sigma_px))
    inside = field_mask(W, H, params)
    # The window comes from the central field (as automatic brightness control measures it).
    vv0, uu0 = np.mgrid[0:H, 0:W]
    rr = np.hypot((uu0 - (W - 1) / 2) / W, (vv0 - (H - 1) / 2) / H)
    central = inside & (rr <= 0.35)
    if exclude is not None:
        central = central & ~np.asarray(exclude, bool)
    inside_t = torch.from_numpy(central if central.sum() > 100 else inside).to(x.device)
    vals = x[inside_t]
    if vals.numel() > 200_000:
        vals = vals[:: vals.numel() // 200_000 + 1]
    lo = float(torch.quantile(vals, params.window_low_pct / 100.0))
    hi = float(torch.quantile(vals, params.window_high_pct / 100.0))
    if not hi > lo:
        hi = lo + 1e-6
    y = torch.clamp((x - lo) / (hi - lo), 0, 1)
    if params.gamma != 1.0:
        y = y ** params.gamma
    if params.metal == "dark":
        y = 1.0 - y
    vv, uu = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    r = torch.hypot(uu - (W - 1) / 2, vv - (H - 1) / 2) / (0.5 * W)
    if params.vignetting > 0:
        y = y * torch.clamp(1 - params.vignetting * r ** 2, min=0)
    if params.field == "circle":
        # Soft-edged circle (one pixel), black outside.
        edge = torch.clamp((params.field_radius * W - r * 0.5 * W) + 0.5, 0, 1)
        y = y * edge
    y_np = y.cpu().numpy()
    lab = None if labels is None else np.asarray(labels, np.uint8).copy()
    if lab is not None:
        lab[~inside] = 0      # nothing is visible in the unexposed surround of the field
    if params.pincushion > 0:
        y_np, lab = _pincushion(y_np, lab, params.pincushion)
    if params.burned_text or params.markers:
        y_np = _burn_in(y_np, params, rng)
    if params.bit_depth == 8:
        img = np.round(np.clip(y_np, 0, 1) * 255).astype(np.uint8)
    else:
        top = (1 << (params.bits_stored or 16)) - 1
        img = np.round(np.clip(y_np, 0, 1) * top).astype(np.uint16)
    return img, lab


def _pincushion(y, lab, k):
    """Radial pincushion: output pixel at radius r shows the undistorted image at r / (1 + k (r/rmax)^2)."""
    H, W = y.shape
    cu, cv = (W - 1) / 2, (H - 1) / 2
    rmax = math.hypot(cu, cv)
    vv, uu = np.mgrid[0:H, 0:W].astype(np.float64)
    du, dv = uu - cu, vv - cv
    r2 = (du * du + dv * dv) / (rmax * rmax)
    s = 1.0 / (1.0 + k * r2)
    gx = (cu + du * s) / (W - 1) * 2 - 1
    gy = (cv + dv * s) / (H - 1) * 2 - 1
    grid = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32))
    yo = F.grid_sample(torch.from_numpy(y)[None, None], grid, mode="bilinear", align_corners=True)[0, 0].numpy()
    lo = None
    if lab is not None:
        lo = F.grid_sample(torch.from_numpy(lab.astype(np.float32))[None, None], grid, mode="nearest",
                           align_corners=True)[0, 0].numpy().astype(np.uint8)
    return yo, lo


_TEXTS = ["L", "R", "AP", "LAT", "LAO 15", "RAO 20", "CRAN 10", "kV {kv}  mA {ma}", "{kv} kV  {ma} mA",
          "FLUORO", "SNAPSHOT", "DSA", "HOSPITAL", "{date}", "{time}", "Pt ID {pid}", "ZOOM 1", "MAG 1.5x",
          "LIH", "FRAME {n}", "PULSE 4 fps", "DAP {dap} mGy.cm2"]


def _burn_in(y, params, rng):
    """Draw text and markers (white or black) into the display image [0..1]."""
    from PIL import Image, ImageDraw, ImageFont

    H, W = y.shape
    img = Image.fromarray(np.round(np.clip(y, 0, 1) * 65535).astype(np.uint16).astype(np.int32), mode="I")
    draw = ImageDraw.Draw(img)
    colour = 65535 if rng.random() < 0.8 else 0
    if params.burned_text:
        size = max(8, int(W * rng.uniform(0.02, 0.045)))
        try:
            font = ImageFont.load_default(size=size)
        except Exception:  # Pillow without FreeType: the fixed bitmap font
            font = ImageFont.load_default()
        for _ in range(int(rng.integers(1, 6))):
            t = _TEXTS[int(rng.integers(len(_TEXTS)))].format(
                kv=int(params.kvp), ma=round(float(rng.uniform(0.5, 12)), 1), date="2024-%02d-%02d" % (rng.integers(1, 13), rng.integers(1, 29)),
                time="%02d:%02d:%02d" % (rng.integers(0, 24), rng.integers(0, 60), rng.integers(0, 60)),
                pid=int(rng.integers(10000, 99999)), n=int(rng.integers(1, 400)), dap=round(float(rng.uniform(1, 90)), 1))
            # Mostly in the corners, like real overlays.
            cx = rng.choice([rng.uniform(0.01, 0.2), rng.uniform(0.6, 0.85), rng.uniform(0.0, 0.9)])
            cy = rng.choice([rng.uniform(0.01, 0.12), rng.uniform(0.85, 0.94), rng.uniform(0.0, 0.95)])
            draw.text((float(cx * W), float(cy * H)), t, fill=colour, font=font)
    if params.markers:
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(4))
            x0, y0 = float(rng.uniform(0.05, 0.95) * W), float(rng.uniform(0.05, 0.95) * H)
            s = float(rng.uniform(0.01, 0.04) * W)
            w = max(1, int(W / 256))
            if kind == 0:      # crosshair
                draw.line([(x0 - s, y0), (x0 + s, y0)], fill=colour, width=w)
                draw.line([(x0, y0 - s), (x0, y0 + s)], fill=colour, width=w)
            elif kind == 1:    # arrow
                x1, y1 = x0 + rng.uniform(-3, 3) * s, y0 + rng.uniform(-3, 3) * s
                draw.line([(x0, y0), (x1, y1)], fill=colour, width=w)
                draw.polygon([(x1, y1), (x1 + s * 0.4, y1 + s * 0.2), (x1 + s * 0.2, y1 + s * 0.4)], fill=colour)
            elif kind == 2:    # ruler ticks along an edge
                for t in range(10):
                    draw.line([(x0 + t * s * 0.5, H * 0.97), (x0 + t * s * 0.5, H * 0.97 - s * (0.5 if t % 5 else 1))],
                              fill=colour, width=w)
            else:              # circle / ROI marker
                draw.ellipse([x0 - s, y0 - s, x0 + s, y0 + s], outline=colour, width=w)
    return np.asarray(img, np.float64).astype(np.float32) / 65535.0


# =============================================================================== the whole view
def render_view(line_integrals: dict, screws, view: geometry.View, params: RenderParams, rng=None,
                device="cpu", distractors=None, screw_paths=None) -> SimulatedView:
    """Compose a view from cached CT line integrals: screws and distractors added, physics, display.

    ``line_integrals``: ``{material: g/cm^2 [v, u]}`` from :func:`ct_line_integrals` (or ``{}``
    for no anatomy); ``screw_paths``: optional precomputed ``(head_mm, shaft_mm)``.
    """
    rng = np.random.default_rng(rng)
    W, H = int(view.width), int(view.height)
    head, shaft = screw_paths if screw_paths is not None else screw_path_lengths(screws, view, device=device)
    labels = labels_from_path_lengths(head, shaft)
    L = {m: v.to(device) for m, v in line_integrals.items()}
    ti = (head + shaft).to(device) * (_density("titanium") * 0.1)     # mm -> g/cm^2
    L["titanium"] = L["titanium"] + ti if "titanium" in L else ti
    if distractors:
        for m, v in distractor_line_integrals(distractors, view, device=device).items():
            L[m] = L[m] + v if m in L else v
    if not any(m not in ("titanium",) for m in L):
        L.setdefault("soft", torch.zeros((H, W), dtype=torch.float32, device=device))
    I = detect(L, params, rng=rng, device=device)
    atten = (-torch.log(I)).cpu().numpy().astype(np.float32)
    metal = sum(L[m] for m in L if m not in ("soft", "bone", "air"))
    exclude = None if isinstance(metal, int) else (metal > 0.01).cpu().numpy()
    img, lab = display(I.cpu(), params, rng=rng, labels=labels, exclude=exclude)
    v = replace(view, metal=params.metal) if hasattr(view, "__dataclass_fields__") else view
    return SimulatedView(image=img, labels=lab, metal=params.metal, attenuation=atten, params=params, view=v)


def simulate_view(ct, screws, view: geometry.View, params: RenderParams | None = None, rng=None,
                  device="cpu", cache: dict | None = None, distractors=None, binning: int = 1) -> SimulatedView:
    """Render one view of a CT (HU ``ct.Volume``, density dict or :class:`PreparedCT`; None = no
    anatomy) with screws and optional distractors.

    ``cache``: a dict reused across calls; CT line integrals are kept in it per (CT, P, size,
    binning) and the prepared CT per CT object, so that rendering many screw sets or render
    parameters for the same views costs only the screws and the physics.
    """
    params = params if params is not None else RenderParams()
    if ct is None:
        L = {}
    else:
        if cache is not None:
            pkey = ("prepared", id(ct))
            ent = cache.get(pkey)
            if ent is None or ent[0] is not ct:
                cache[pkey] = (ct, prepare_ct(ct, device=device))
            pct = cache[pkey][1]
            key = ("ct", pct.key, np.asarray(view.P, float).round(9).tobytes(), int(view.width), int(view.height),
                   int(binning), str(device))
            if key not in cache:
                cache[key] = ct_line_integrals(pct, view, device=device, binning=binning)
            L = cache[key]
        else:
            L = ct_line_integrals(ct, view, device=device, binning=binning)
    return render_view(L, screws, view, params, rng=rng, device=device, distractors=distractors)
