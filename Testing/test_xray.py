"""X-ray simulator: line integrals, screw path lengths, label maps, physics, display, DiffDRR agreement."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from PedicleScrewPoseLib import ct as ctmod
from PedicleScrewPoseLib import geometry, screw, xray

torch.set_num_threads(2)


def _ncc(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))


def _sphere_volume(radius_mm, density, spacing, extent_mm=80.0, ss=4):
    """A ball of ``density`` g/cm^3 at the origin, partial-volume voxels (supersampled)."""
    n = [int(round(extent_mm / s)) for s in spacing]
    A = np.diag([*spacing, 1.0])
    A[:3, 3] = [-(m - 1) / 2 * s for m, s in zip(n, spacing)]
    kk, jj, ii = np.meshgrid(*(np.arange(m) for m in n[::-1]), indexing="ij")
    frac = np.zeros(kk.shape, np.float32)
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    for a in offs:
        for b in offs:
            for c in offs:
                x = (ii + a) * spacing[0] + A[0, 3]
                y = (jj + b) * spacing[1] + A[1, 3]
                z = (kk + c) * spacing[2] + A[2, 3]
                frac += (x * x + y * y + z * z <= radius_mm ** 2) / ss ** 3
    return ctmod.Volume(array=frac * density, ijk_to_ras=A)


def _ray_distance_to_origin(view):
    uu, vv = np.meshgrid(np.arange(view.width), np.arange(view.height))
    src, d = geometry.backproject(view.P, np.stack([uu.ravel(), vv.ravel()], 1).astype(float))
    t = -(d @ src)
    closest = src[None] + t[:, None] * d
    return np.linalg.norm(closest, axis=1).reshape(view.height, view.width)


@pytest.mark.parametrize("backend", ["torch", "rtk"])
@pytest.mark.parametrize("spacing,lao,cranial", [((1.0, 1.0, 1.0), 0, 0), ((1.0, 1.0, 1.0), 90, 0),
                                                  ((0.8, 0.8, 1.6), 35, 12)])
def test_sphere_gives_analytic_chord(spacing, lao, cranial, backend):
    r, rho = 30.0, 1.5
    vol = _sphere_volume(r, rho, spacing)
    view = geometry.carm_view("v", isocenter_mm=(0, 0, 0), lao_deg=lao, cranial_deg=cranial, width=96, height=96,
                              pixel_mm=1.0)
    L = xray.ct_line_integrals({"soft": vol}, view, backend=backend)["soft"].numpy()
    dist = _ray_distance_to_origin(view)
    analytic = 2 * np.sqrt(np.clip(r ** 2 - dist ** 2, 0, None)) * rho * 0.1   # g/cm^2
    inner = dist < 0.8 * r
    assert inner.sum() > 500
    rel = np.abs(L[inner] - analytic[inner]) / analytic[inner]
    assert rel.max() < 0.02, rel.max()
    assert np.abs(L[dist > r + 3 * max(spacing)]).max() < 1e-4


def test_binning_and_downsample_stay_close():
    vol = _sphere_volume(30.0, 1.0, (1.0, 1.0, 1.0))
    view = geometry.carm_view("v", isocenter_mm=(0, 0, 0), lao_deg=20, width=96, height=96, pixel_mm=1.0)
    full = xray.ct_line_integrals({"soft": vol}, view)["soft"].numpy()
    binned = xray.ct_line_integrals({"soft": vol}, view, binning=2)["soft"].numpy()
    assert binned.shape == full.shape
    assert _ncc(full, binned) > 0.995
    pct = xray.prepare_ct({"soft": vol}, downsample=2)
    down = xray.ct_line_integrals(pct, view)["soft"].numpy()
    # box-averaging conserves mass: the image integrals agree
    assert abs(down.sum() / full.sum() - 1) < 0.01


def _test_screw(entry=(5.0, -30.0, 2.0), tip_dir=(-0.25, 1.0, 0.1), d=6.5, L=45.0, roll=17.0):
    spec = screw.ScrewSpec.from_size(d, L)
    e = np.asarray(entry, float)
    u = np.asarray(tip_dir, float) / np.linalg.norm(tip_dir)
    return screw.Screw(spec, screw.pose_from_entry_tip(e, e + L * u, roll_deg=roll), id="T")


@pytest.mark.parametrize("lao,cranial", [(0, 0), (90, 0), (-90, 5), (25, -10), (-30, 15)])
def test_projected_axis_lies_on_shaft_pixels(lao, cranial):
    s = _test_screw()
    view = geometry.carm_view("v", isocenter_mm=(0, -10, 0), lao_deg=lao, cranial_deg=cranial, width=128,
                              height=128, pixel_mm=1.2)
    head, shaft = xray.screw_path_lengths([s], view)
    labels = xray.labels_from_path_lengths(head, shaft)
    # points of the shaft's axis (entry to the start of the conical tip), projected by P
    pts = np.linspace(s.entry_mm + 1.0 * s.axis, s.tip_mm - s.spec.tip_length_mm * s.axis, 60)
    uv = np.round(view.project(pts)).astype(int)
    lab = labels[uv[:, 1], uv[:, 0]]
    hd = head.numpy()[uv[:, 1], uv[:, 0]]
    assert np.all(lab > 0)
    # wherever no head material lies on the ray, the axis pixel is shaft
    assert np.all(lab[hd <= xray.LABEL_THRESHOLD_MM] == 2)
    assert (lab == 2).sum() >= 5
    # ... and a pixel well off the axis (beyond the head radius) is background
    off = view.project(s.entry_mm + 25.0 * s.axis + 12.0 * np.cross(s.axis, view.axis) / np.linalg.norm(np.cross(s.axis, view.axis)))
    assert labels[int(round(off[1])), int(round(off[0]))] == 0


def test_screw_path_lengths_conserve_titanium_volume():
    # Near-parallel rays: the sum of path lengths times the pixel area (at the screw) is its volume.
    s = _test_screw(entry=(0, -25, 0), tip_dir=(0, 1, 0))
    view = geometry.carm_view("v", isocenter_mm=(0, -8, 0), lao_deg=90, width=200, height=200,
                              sid_mm=20000, sdd_mm=20000, pixel_mm=0.4)
    head, shaft = xray.screw_path_lengths([s], view)
    px_mm = view.pixel_to_mm_at(s.entry_mm)
    head_v, shaft_v = screw.attenuation_volume(s.spec).volume_mm3()
    assert float(shaft.sum()) * px_mm ** 2 == pytest.approx(shaft_v, rel=0.01)
    assert float(head.sum()) * px_mm ** 2 == pytest.approx(head_v, rel=0.01)


def test_label_rule_head_over_shaft():
    head = torch.tensor([[0.0, 0.2, 0.0, 0.01]])
    shaft = torch.tensor([[0.0, 3.0, 2.0, 0.01]])
    assert xray.labels_from_path_lengths(head, shaft).tolist() == [[0, 1, 2, 0]]
    s = _test_screw()
    view = geometry.carm_view("v", isocenter_mm=(0, -10, 0), lao_deg=60, width=96, height=96, pixel_mm=1.5)
    lab = xray.label_map([s], view)
    h, sh = xray.screw_path_lengths([s], view)
    assert np.array_equal(lab == 1, h.numpy() > xray.LABEL_THRESHOLD_MM)
    assert np.array_equal(lab == 2, (h.numpy() <= xray.LABEL_THRESHOLD_MM) & (sh.numpy() > xray.LABEL_THRESHOLD_MM))
    assert (lab == 1).sum() > 20 and (lab == 2).sum() > 20


def test_monochromatic_detection_is_beer_lambert():
    L = {"soft": torch.full((8, 8), 20.0), "titanium": torch.linspace(0, 2, 64).view(8, 8)}
    I = xray.detect(L, xray.RenderParams.ideal())
    E = np.array([60.0])
    mu = {m: ctmod.mass_attenuation_cm2_g(m, E)[0] for m in L}
    expect = np.exp(-(mu["soft"] * L["soft"].numpy() + mu["titanium"] * L["titanium"].numpy()))
    np.testing.assert_allclose(I.numpy(), expect, rtol=1e-4)


def test_polychromatic_titanium_hardens_the_beam():
    # effective attenuation per g/cm^2 falls with thickness (the beam hardens), unlike monochromatic
    t = torch.tensor([[0.5, 1.0, 2.0, 4.0]]) * 0.443          # 0.5 .. 4 mm titanium, g/cm^2
    p = xray.RenderParams(kvp=90, photons_per_pixel=None, scatter_fraction=0, blur_px=0)
    I = xray.detect({"soft": torch.full((1, 4), 15.0), "titanium": t}, p)
    I0 = xray.detect({"soft": torch.full((1, 4), 15.0), "titanium": torch.zeros(1, 4)}, p)
    mu_eff = (-torch.log(I / I0) / t).numpy().ravel()
    assert np.all(np.diff(mu_eff) < 0)
    E, w = xray.spectrum(90, 3.0)
    assert abs(w.sum() - 1) < 1e-9 and 25 < (E * w).sum() < 60


def test_collimator_shutters_pass_a_few_percent():
    p = xray.RenderParams(photons_per_pixel=None, scatter_fraction=0, blur_px=0, heel=0.0,
                          collimator=(0.25, 0.0, 0.125, 0.0))
    open_ = xray.unshuttered_mask(64, 32, p)
    assert open_.shape == (32, 64)
    assert not open_[:, :16].any() and not open_[:, 56:].any() and open_[:, 16:56].all()
    assert xray.unshuttered_mask(64, 32, xray.RenderParams()).all()
    # as displayed: warped like the image by the display's pincushion (the edges pulled inwards)
    import dataclasses
    warped = xray.unshuttered_mask(64, 32, dataclasses.replace(p, pincushion=0.1), as_displayed=True)
    assert warped.shape == (32, 64) and abs(int(warped[16].sum()) - 40) <= 4 and (warped != open_).any()
    I = xray.detect({"soft": torch.full((32, 64), 15.0)}, p).numpy()
    # behind a shutter (away from its blurred edge) the beam is the shutter's transmission
    np.testing.assert_allclose(I[:, :10] / I[:, 30:34].mean(), p.collimator_transmission, rtol=1e-3)
    np.testing.assert_allclose(I[:, 62:] / I[:, 30:34].mean(), p.collimator_transmission, rtol=1e-3)


def test_quantum_noise_follows_dose():
    L = {"soft": torch.full((64, 64), 15.0)}
    sd = []
    for n in (200.0, 20000.0):
        p = xray.RenderParams(photons_per_pixel=n, scatter_fraction=0, blur_px=0)
        sd.append(float(xray.detect(L, p, rng=1).std() / xray.detect(L, p, rng=1).mean()))
    # relative noise ~ 1/sqrt(N): 100x the photons, ~10x less noise
    assert 7 < sd[0] / sd[1] < 13


def test_polarity_inverts_screw_contrast():
    s = _test_screw()
    view = geometry.carm_view("v", isocenter_mm=(0, -10, 0), lao_deg=90, width=96, height=96, pixel_mm=1.5)
    L = {"soft": torch.full((96, 96), 18.0)}
    imgs = {}
    for metal in ("bright", "dark"):
        p = xray.RenderParams(metal=metal, photons_per_pixel=None, bit_depth=8)
        imgs[metal] = xray.render_view(L, [s], view, p, rng=0)
    lab = imgs["bright"].labels
    b = imgs["bright"].image.astype(float)
    d = imgs["dark"].image.astype(float)
    assert b[lab > 0].mean() > b[lab == 0].mean() + 100
    assert d[lab > 0].mean() < d[lab == 0].mean() - 100
    np.testing.assert_allclose(b + d, 255, atol=1)
    assert imgs["dark"].metal == "dark" and imgs["dark"].view.metal == "dark"


def test_display_options_and_output_types():
    L = {"soft": torch.full((80, 80), 15.0) + torch.linspace(0, 3, 80)[None]}
    view = geometry.carm_view("v", width=80, height=80, pixel_mm=2.0)
    p = xray.RenderParams(field="circle", vignetting=0.3, bit_depth=16, bits_stored=12, burned_text=True,
                          markers=True, drc=0.4, edge_enhance=1.0, pincushion=0.03)
    sv = xray.render_view(L, [], view, p, rng=3)
    assert sv.image.dtype == np.uint16 and sv.image.max() <= 4095
    assert sv.image[0, 0] == 0 and sv.image[-1, -1] == 0           # black surround of the circle
    assert sv.labels.shape == (80, 80) and sv.labels.dtype == np.uint8
    ideal = xray.render_view(L, [], view, xray.RenderParams.ideal(), rng=3)
    assert ideal.image.dtype == np.uint16
    # ideal: no noise, monotone in the attenuation ramp
    assert np.all(np.diff(ideal.image[40].astype(int)) >= 0)


def test_random_params_are_valid_and_varied():
    ps = [xray.RenderParams.random(i) for i in range(40)]
    assert {p.metal for p in ps} == {"bright", "dark"}
    assert {p.field for p in ps} == {"circle", "square"}
    assert {p.bit_depth for p in ps} == {8, 16}
    assert all(p.pincushion == 0 for p in ps)                      # distortion only when asked
    assert any(xray.RenderParams.random(i, distortion=True).pincushion > 0 for i in range(40))
    with pytest.raises(ValueError, match="metal"):
        xray.RenderParams(metal="grey")
    with pytest.raises(ValueError, match="kvp"):
        xray.RenderParams(kvp=500)


def test_same_seed_same_bytes():
    s = _test_screw()
    view = geometry.carm_view("v", isocenter_mm=(0, -10, 0), lao_deg=30, width=96, height=96, pixel_mm=1.5)
    L = {"soft": torch.full((96, 96), 18.0), "bone": torch.full((96, 96), 2.0)}
    p = xray.RenderParams.random(7)
    dis = xray.random_distractors(4, (0, 0, 0), screws=[s], n=4)
    a = xray.render_view(L, [s], view, p, rng=11, distractors=dis)
    b = xray.render_view(L, [s], view, p, rng=11, distractors=xray.random_distractors(4, (0, 0, 0), screws=[s], n=4))
    c = xray.render_view(L, [s], view, p, rng=12, distractors=dis)
    assert a.image.tobytes() == b.image.tobytes() and a.labels.tobytes() == b.labels.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_distractors_are_metal_but_not_labels():
    view = geometry.carm_view("v", isocenter_mm=(0, 0, 0), lao_deg=0, width=96, height=96, pixel_mm=1.5)
    bead = xray.Distractor("beads", "sphere", "steel", np.array([0.0, 0.0, 0.0]), radius_mm=5.0)
    wire = xray.Distractor("kwire", "cylinder", "steel", np.array([-40.0, 0, 10]), np.array([40.0, 0, 10]),
                           radius_mm=1.0)
    box = xray.Distractor("retractor", "box", "steel", np.array([0.0, 0, -30]), axes=np.eye(3),
                          half_mm=np.array([20.0, 1.0, 5.0]))
    L = xray.distractor_line_integrals([bead, wire, box], view)["steel"].numpy()
    rho = ctmod.DENSITY_G_CM3["steel"] * 0.1
    c = np.round(view.project([0.0, 0.0, 0.0])).astype(int)
    assert L[c[1], c[0]] == pytest.approx(10.0 * rho, rel=0.02)            # bead diameter
    w = np.round(view.project([20.0, 0, 10])).astype(int)
    assert 1.5 * rho < L[w[1], w[0]] <= 2.0 * rho + 1e-6                   # wire chord <= its diameter
    bx = np.round(view.project([0.0, 0, -30])).astype(int)
    assert L[bx[1], bx[0]] == pytest.approx(2.0 * rho, rel=0.05)            # box thickness along the ray
    s = _test_screw()
    base = {"soft": torch.full((96, 96), 15.0)}
    p = xray.RenderParams(photons_per_pixel=None)
    with_d = xray.render_view(base, [s], view, p, rng=0, distractors=[bead, wire])
    without = xray.render_view(base, [s], view, p, rng=0)
    assert np.array_equal(with_d.labels, without.labels)
    assert not np.array_equal(with_d.image, without.image)
    out, dis = xray.add_distractors(base, view, rng=5, screws=[s], n=3)
    assert len(dis) >= 3 and set(out) >= {"soft"}


def test_agrees_with_diffdrr_siddon_on_example_ct():
    """Same density volume, same world rays: ours (Joseph) vs DiffDRR's Siddon; NCC >= 0.99."""
    warnings.filterwarnings("ignore")
    from diffdrr.data import read
    from diffdrr.drr import DRR
    from torchio import ScalarImage

    ct, labels = ctmod.example_ct()
    d = ctmod.material_densities(ct.array)
    dens = torch.from_numpy(d["soft"] + d["bone"])
    small = torch.nn.functional.avg_pool3d(dens[None, None], (1, 4, 4))[0, 0].numpy()
    A = ct.ijk_to_ras @ np.array([[4, 0, 0, 1.5], [0, 4, 0, 1.5], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    vol = ctmod.Volume(array=small, ijk_to_ras=A)
    arr_ijk = torch.from_numpy(np.ascontiguousarray(small.transpose(2, 1, 0)))
    subject = read(ScalarImage(tensor=arr_ijk[None], affine=A), orientation=None, center_volume=False)
    drr = DRR(subject, sdd=1000.0, height=64, width=64, delx=1.0, renderer="siddon")
    spine = labels.array == labels.value_of("T12")
    iso = ct.ijk_to_ras_points(np.argwhere(spine)[:, ::-1].mean(0)[None])[0]
    for lao in (0, 90, 35):
        view = geometry.carm_view("v", isocenter_mm=iso, lao_deg=lao, width=64, height=64, pixel_mm=4.8)
        ours = xray.ct_line_integrals({"density": vol}, view)["density"].numpy()
        uu, vv = np.meshgrid(np.arange(64), np.arange(64))
        src, dirs = geometry.backproject(view.P, np.stack([uu.ravel(), vv.ravel()], 1).astype(float))
        source = torch.tensor(np.repeat(src[None], len(dirs), 0), dtype=torch.float32)[None]
        target = torch.tensor(src[None] + 2000.0 * dirs, dtype=torch.float32)[None]
        with torch.no_grad():
            ref = drr.render(arr_ijk, source, target).reshape(64, 64).numpy() * 0.1   # mm -> cm
        assert _ncc(ours, ref) >= 0.99
        assert abs(ours.mean() / ref.mean() - 1) < 0.02


def test_example_ct_view_is_plausible():
    ct, labels = ctmod.example_ct()
    pct = xray.prepare_ct(ct, downsample=(2, 2, 1))
    iso = ct.ijk_to_ras_points(np.argwhere(labels.array == labels.value_of("T12"))[:, ::-1].mean(0)[None])[0]
    view = geometry.carm_view("AP", isocenter_mm=iso, lao_deg=0, width=64, height=64, pixel_mm=4.8)
    L = xray.ct_line_integrals(pct, view)
    assert set(L) == {"soft", "bone"}
    # through an adult trunk: 10-40 g/cm^2 of soft tissue; the spine's column carries bone
    assert 10 < float(L["soft"][32, 32]) < 40
    col = L["bone"].numpy().mean(0)
    assert col[24:40].max() > 3 * np.median(col)
    with pytest.raises(ValueError):
        xray.prepare_ct({"soft": ctmod.Volume(array=np.full((4, 4, 4), np.nan, np.float32), ijk_to_ras=np.eye(4))})


@pytest.mark.parametrize("lao", [0, 90, 40])
def test_screw_joseph_and_march_agree(lao):
    s = _test_screw()
    view = geometry.carm_view("v", isocenter_mm=(0, -10, 0), lao_deg=lao, width=128, height=128, pixel_mm=1.0)
    hj, sj = xray.screw_path_lengths([s], view, method="joseph")
    hm, sm = xray.screw_path_lengths([s], view, method="march")
    for a, b in ((hj, hm), (sj, sm)):
        a, b = a.numpy(), b.numpy()
        assert a.sum() == pytest.approx(b.sum(), rel=0.005)
        assert _ncc(a, b) > 0.999
    with pytest.raises(ValueError, match="method"):
        xray.screw_path_lengths([s], view, method="siddon")


def test_rtk_and_torch_backends_agree_on_example_ct():
    ct, labels = ctmod.example_ct()
    pct = xray.prepare_ct(ct, downsample=(2, 2, 1), extend_mm=30)
    iso = ct.ijk_to_ras_points(np.argwhere(labels.array == labels.value_of("L1"))[:, ::-1].mean(0)[None])[0]
    for lao in (0, 90, -25):
        view = geometry.carm_view("v", isocenter_mm=iso, lao_deg=lao, cranial_deg=5, width=80, height=64,
                                  pixel_mm=3.0, principal_offset_px=(4.0, -3.0))
        a = xray.ct_line_integrals(pct, view, backend="torch")
        b = xray.ct_line_integrals(pct, view, backend="rtk")
        for m in ("soft", "bone"):
            assert _ncc(a[m].numpy(), b[m].numpy()) > 0.999
            assert float(b[m].mean() / a[m].mean()) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="backend"):
        xray.ct_line_integrals(pct, view, backend="siddon")
