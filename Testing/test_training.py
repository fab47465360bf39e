"""Training of the segmentation U-Net: bank, samples, a few real optimiser steps, resume, init.

Small on purpose (one bank view, 64 px crops, batch 2): it checks the machinery that
`pedicle-screw-pose train-segmentation` runs for hours, not the model's quality
(test_segmentation.py and bench/bench_segmentation.py do that).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from PedicleScrewPoseLib import segmentation, training


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "bank.npz"
    training.build_bank(path, n_views=1, seed=123, split="train", progress=False)
    return path


def test_bank_is_seeded_and_reloaded(bank_path):
    bank = training.load_or_build_bank(bank_path, 1, 123, split="train")
    assert bank["soft"].shape[0] == 1 and bank["soft"].shape == bank["bone"].shape
    assert len(bank["scr_view"]) > 0, "no candidate screw projected into the view"
    # each screw's crop is non-empty titanium somewhere
    for k in range(len(bank["scr_view"])):
        _box, head, shaft = training._bank_screw(bank, k)
        assert (head.astype(np.float32) + shaft.astype(np.float32)).max() > training._label_threshold_mm()


def test_samples_are_reproducible_and_labelled(bank_path):
    bank = training.load_or_build_bank(bank_path, 1, 123, split="train")
    a = training.render_sample(bank, np.random.default_rng(7), out_px=64, style={"n_screws": 3})
    b = training.render_sample(bank, np.random.default_rng(7), out_px=64, style={"n_screws": 3})
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    img, lab, metal = a
    assert img.shape == lab.shape == (64, 64) and img.dtype in (np.uint8, np.uint16)
    assert set(np.unique(lab)) <= {0, 1, 2} and metal in ("bright", "dark")
    empty = training.render_sample(bank, np.random.default_rng(8), out_px=64, style={"n_screws": 0})
    assert not empty[1].any(), "an image without screws must have an empty label map"
    x, y = training.training_pair(bank, np.random.default_rng(9), out_px=64)
    assert x.shape == (1, 64, 64) and x.dtype == np.float32 and np.isfinite(x).all()
    assert y.shape == (1, 64, 64) and y.dtype == np.int64


def test_train_writes_loadable_weights_and_resumes(bank_path, tmp_path):
    out = tmp_path / "run"
    kw = dict(seed=123, n_bank_views=1, bank_path=bank_path, batch_size=2, crop_px=64, workers=0,
              log_every=1, ckpt_every=1, progress=False)
    w = training.train(out, steps=2, **kw)
    model = segmentation.load_model(w)   # hash written beside it and checked
    assert model.meta["steps"] == 2 and model.meta["init"] is None
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    # resume continues the step count from the checkpoint instead of starting again
    w2 = training.train(out, steps=3, resume=True, **kw)
    assert segmentation.load_model(w2).meta["steps"] == 3


def test_init_starts_from_given_weights(bank_path, tmp_path):
    src = tmp_path / "init" / "w.pt"
    m0 = segmentation.build_model()
    with torch.no_grad():
        for p in m0.parameters():
            p.fill_(0.01)
    segmentation.save_weights(m0, src)
    kw = dict(seed=5, n_bank_views=1, bank_path=bank_path, batch_size=2, crop_px=64, workers=0, progress=False,
              lr=1e-12)
    w = training.train(tmp_path / "ft", steps=1, init=src, **kw)
    m1 = segmentation.load_model(w)
    assert m1.meta["init"]["sha256"] == segmentation.sha256_of(src)
    first = next(iter(m1.state_dict().values()))
    # a learning rate of 1e-12 leaves the initial weights (0.01), not a random initialisation
    assert torch.allclose(first, torch.full_like(first, 0.01), atol=1e-6)


def test_train_needs_a_budget(tmp_path):
    with pytest.raises(ValueError, match="--steps or --minutes"):
        training.train(tmp_path, steps=None, minutes=None)


def test_renderer_pairs_are_reproducible_and_labelled(bank_path):
    bank = training.load_or_build_bank(bank_path, 1, 123, split="train")
    a = training.renderer_pairs(bank, np.random.default_rng(3), n_crops=3, out_px=64)
    b = training.renderer_pairs(bank, np.random.default_rng(3), n_crops=3, out_px=64)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert xa.shape == (1, 64, 64) and xa.dtype == np.float32 and np.isfinite(xa).all()
        assert ya.shape == (1, 64, 64) and ya.dtype == np.int64 and set(np.unique(ya)) <= {0, 1, 2}
    # crops of one rendered view differ (each its own zoom, rotation and place)
    assert not np.array_equal(a[0][0], a[1][0])


def test_visible_screws_drops_a_screw_that_shows_no_contrast():
    rng = np.random.default_rng(0)
    x = (0.5 + rng.normal(0, 0.1, (96, 96))).astype(np.float32)
    labels = np.zeros((96, 96), np.uint8)
    labels[10:16, 10:60] = 2          # a shaft that shows (+0.3)
    x[10:16, 10:60] += 0.3
    labels[40:46, 10:60] = 2          # a shaft under the noise with no contrast at all
    labels[60:90, 60:90] = 1          # a head wider than the background kernel, no contrast
    keep = training._visible_screws(x, labels)
    assert keep[10:16, 10:60].all()
    assert not keep[40:46, 10:60].any() and not keep[60:90, 60:90].any()
    assert keep[labels == 0].all()
    # the per-pixel test keeps a speckle of the invisible shaft and the wide head's centre
    per_pixel = training._metal_visible(x, (labels > 0).astype(np.float32), np.zeros_like(x))
    assert per_pixel[40:46, 10:60].any() and per_pixel[70:80, 70:80].all()


def test_train_mixes_in_rendered_views(bank_path, tmp_path):
    kw = dict(seed=123, n_bank_views=1, bank_path=bank_path, batch_size=2, crop_px=64, workers=0, progress=False)
    w = training.train(tmp_path / "mix", steps=1, p_renderer=0.5, **kw)
    assert segmentation.load_model(w).meta["p_renderer"] == 0.5
    with pytest.raises(ValueError, match="p_renderer"):
        training.train(tmp_path / "bad", steps=1, p_renderer=1.5, **kw)


def test_train_precision_is_recorded_and_checked(bank_path, tmp_path):
    kw = dict(seed=123, n_bank_views=1, bank_path=bank_path, batch_size=2, crop_px=64, workers=0, progress=False)
    # bfloat16 autocast on the forward pass (emulated where the CPU lacks it): weights stay float32
    w = training.train(tmp_path / "bf16", steps=1, precision="bfloat16", **kw)
    m = segmentation.load_model(w)
    assert m.meta["precision"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert segmentation.load_model(training.train(tmp_path / "fp32", steps=1, precision="float32", **kw)
                                   ).meta["precision"] == "float32"
    with pytest.raises(ValueError, match="precision"):
        training.train(tmp_path / "bad", steps=1, precision="float16", **kw)
