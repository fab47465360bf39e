"""A second, deliberately plain X-ray renderer for the benchmarks: screws as voxel blocks, one
energy, a plain log display.

The pipeline is also scored on cases that another group's renderer makes, which we never see.
Such renderers commonly insert the implant into the CT as a voxel mask and project the whole
volume (DeepDRR, DiffDRR, a CT-based DRR), then show ``-log(I/I0)`` in a linear window.  So
this one differs from ``xray.render_view`` (and from the training compositor) in each step:

* screws: binary titanium voxels of ``VOXEL_MM`` in the screw's frame (voxel centres inside
  the model, no partial volume): stair-stepped edges and thread, where ours are smooth;
* physics: one energy (``ENERGY_KEV``, with ``xraydb`` attenuation), Poisson quantum noise of
  ``photons`` per unattenuated pixel, a Gaussian detector blur; no spectrum, no scatter, no heel,
  no collimator, no image-intensifier circle, no burned-in text;
* display: ``-log(I/I0)`` (metal bright) or ``I/I0`` (metal dark), a window from the 0.5th to the
  99.5th percentile over the whole image, 8 or 16 bit;
* the metal hint is written in half of the cases only (``run`` decides the polarity itself in
  the others).

The anatomy (``xray.ct_line_integrals`` of the example CT), the screw plans
(``planning.plan_screws``) and the C-arm geometry (``simulate.make_view``) are the simulator's,
unless ``geometry="prone"`` (``prone_view``: the operating room's geometry, which the simulator
does not draw).
Labels come from the same voxel screws (``xray.labels_from_path_lengths``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

VOXEL_MM = 0.6
ENERGY_KEV = 65.0


@contextlib.contextmanager
def _binary_screw_voxels(cannula_mm: float = 0.0):
    """While rendering: screw volumes of whole voxels (``supersample=1`` gives each voxel 0 or 1
    from its centre) instead of the titanium fraction per voxel.  ``cannula_mm`` > 0: a channel
    of that diameter bored along the axis through head and shaft (a cannulated screw)."""
    from PedicleScrewPoseLib import screw

    original = screw.attenuation_volume

    def blocky(spec, voxel_mm=0.25, supersample=3):
        v = original(spec, voxel_mm, 1)
        if cannula_mm <= 0:
            return v
        _nz, ny, nx = v.head.shape
        x = v.origin_mm[0] + v.voxel_mm * np.arange(nx)
        y = v.origin_mm[1] + v.voxel_mm * np.arange(ny)
        bore = (x[None, :] ** 2 + y[:, None] ** 2 < (cannula_mm / 2) ** 2)[None]
        return dataclasses.replace(v, head=np.where(bore, 0, v.head).astype(np.float32),
                                   shaft=np.where(bore, 0, v.shaft).astype(np.float32))

    screw.attenuation_volume = blocky
    try:
        yield
    finally:
        screw.attenuation_volume = original


def render(line_integrals: dict, screws, view, rng, metal: str, photons: float, blur_px: float,
           bits: int, cannula_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8/uint16 [v, u], labels uint8 [v, u]) of one view."""
    from PedicleScrewPoseLib import xray

    with _binary_screw_voxels(cannula_mm):
        head, shaft = xray.screw_path_lengths(screws, view, voxel_mm=VOXEL_MM, method="joseph")
    labels = xray.labels_from_path_lengths(head, shaft)
    L = {m: v.float() for m, v in line_integrals.items()}
    L["titanium"] = L.get("titanium", 0) + (head + shaft) * (xray._density("titanium") * 0.1)  # mm -> g/cm^2
    E = np.array([ENERGY_KEV])
    expo = sum(float(xray.mass_attenuation(m, E)[0]) * L[m] for m in L)
    # Poisson counts (their normal approximation, floored at half a photon), then the detector's blur.
    lam = photons * torch.exp(-expo)
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    counts = torch.clamp(lam + torch.sqrt(lam) * torch.randn(lam.shape, generator=g), min=0.5)
    rel = counts.numpy() / photons
    if blur_px > 0:
        rel = ndimage.gaussian_filter(rel, blur_px, mode="nearest")
    img = -np.log(rel) if metal == "bright" else rel
    lo, hi = np.percentile(img, [0.5, 99.5])
    y = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    top = 255 if bits == 8 else 65535
    out = np.round(y * top).astype(np.uint8 if bits == 8 else np.uint16)
    return out, labels


def prone_view(name: str, isocenter_mm, rng, image_size: int):
    """A C-arm view as in the operating room, unlike ``simulate.make_view``'s: the patient prone,
    so the AP view has its source anterior (under the table) and its detector posterior; the
    lateral from either side; wider tilts (cranial up to 12 degrees to square the endplates), a flat
    panel of 300-400 mm at lower magnification, a detector 4:5 (``image_size`` wide), roll and
    principal point further off."""
    from PedicleScrewPoseLib import geometry

    key = name.strip().lower()
    if key == "ap":
        lao, cranial = 180.0 + rng.uniform(-8.0, 8.0), rng.uniform(-12.0, 12.0)
    elif key == "lat":
        lao, cranial = float(rng.choice([-90.0, 90.0])) + rng.uniform(-8.0, 8.0), rng.uniform(-8.0, 8.0)
    else:  # an oblique from either side of the AP
        lao, cranial = 180.0 + float(rng.choice([-1.0, 1.0])) * rng.uniform(15.0, 35.0), rng.uniform(-10.0, 10.0)
    sdd = float(rng.uniform(1100.0, 1250.0))
    sid = float(sdd * rng.uniform(0.68, 0.80))
    detector_mm = float(rng.uniform(300.0, 400.0))
    width, height = int(image_size), int(round(image_size * 0.8))
    return geometry.carm_view(name.strip().upper(), isocenter_mm=isocenter_mm, lao_deg=float(lao),
                              cranial_deg=float(cranial), sid_mm=sid, sdd_mm=sdd, pixel_mm=detector_mm / width,
                              width=width, height=height,
                              principal_offset_px=tuple(float(x) for x in rng.uniform(-20.0, 20.0, 2)),
                              detector_roll_deg=float(rng.uniform(-5.0, 5.0)))


def simulate_case(out_dir, ct, labels, seed: int, view_names=("ap", "lat", "obl"), image_size: int = 512,
                  cache: dict | None = None, **fixed) -> dict:
    """One case folder (CASE_FORMAT.md) from this renderer; the same layout as ``simulate.simulate_case``.

    ``fixed``: any of ``metal``, ``hint``, ``bits``, ``photons``, ``blur_px`` set instead of drawn
    (the draws still happen, so the rest of the case stays the same), ``cannula_mm`` (never
    drawn; 0: solid screws) and ``geometry`` (never drawn: "simulator", ``simulate.make_view``'s
    views, or "prone", :func:`prone_view`'s)."""
    from PedicleScrewPoseLib import io, planning, simulate, xray

    if fixed.get("geometry", "simulator") not in ("simulator", "prone"):
        raise ValueError(f"simulate_case: geometry {fixed['geometry']!r}: use 'simulator' or 'prone'")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    present = simulate._levels_present(labels)
    n = max(1, min(int(rng.integers(4, 7)), len(present)))
    start = int(rng.integers(0, len(present) - n + 1))
    levels = tuple(present[start:start + n])
    screws = planning.plan_screws(labels, ct, levels=levels, rng=rng, misplacement=0.2)
    if not screws:
        raise ValueError(f"no screw could be planned at levels {list(levels)}")
    iso = np.array([(s.entry_mm + s.tip_mm) / 2 for s in screws]).mean(axis=0) + rng.normal(0.0, 5.0, 3)
    cache = {} if cache is None else cache
    if "pct" not in cache:
        cache["pct"] = xray.prepare_ct(ct, extend_mm=80.0)
    drawn = {"metal": "bright" if rng.random() < 0.5 else "dark", "hint": bool(rng.random() < 0.5),
             "bits": 8 if rng.random() < 0.5 else 16,
             "photons": float(np.exp(rng.uniform(np.log(300.0), np.log(20000.0)))),
             "blur_px": float(rng.uniform(0.0, 1.2)), "cannula_mm": 0.0, "geometry": "simulator"}
    unknown = set(fixed) - set(drawn)
    if unknown:
        raise ValueError(f"simulate_case: unknown settings {sorted(unknown)}; fix any of {sorted(drawn)}")
    drawn.update(fixed)
    metal, hint, bits = drawn["metal"], drawn["hint"], drawn["bits"]
    photons, blur_px, cannula_mm = float(drawn["photons"]), float(drawn["blur_px"]), float(drawn["cannula_mm"])
    views, images, label_maps, per_view = [], [], {}, []
    for name in view_names:
        if drawn["geometry"] == "prone":
            view = prone_view(name, iso, rng, image_size)
        else:
            view = simulate.make_view(name, iso, rng, image_size=image_size, realistic=True)
        li = xray.ct_line_integrals(cache["pct"], view)
        img, lab = render(li, screws, view, rng, metal, photons * (0.5 if "LAT" in view.name else 1.0), blur_px, bits,
                          cannula_mm)
        view = dataclasses.replace(view, metal=metal if hint else None)
        views.append(view)
        images.append(img)
        label_maps[view.name] = lab
        per_view.append({"name": view.name, "params": {"renderer": "bench/voxel_render.py", "metal": metal,
                                                       "photons": photons, "blur_px": blur_px, "bits": bits,
                                                       "energy_kev": ENERGY_KEV, "voxel_mm": VOXEL_MM,
                                                       "cannula_mm": cannula_mm, "geometry": drawn["geometry"]}})
    implants = [{"diameter_mm": float(s.spec.diameter_mm), "length_mm": float(s.spec.length_mm)} for s in screws]
    implants = [implants[i] for i in rng.permutation(len(implants))]
    io.write_case(out_dir, views, images, implants=implants,
                  extra={"simulator": {"renderer": "bench/voxel_render.py", "seed": int(seed), "levels": list(levels)}})
    io.write_truth(out_dir, screws, label_maps, extra={"views": per_view, "isocenter_mm": [float(x) for x in iso]})
    return {"case_dir": str(out_dir), "n_screws": len(screws)}
