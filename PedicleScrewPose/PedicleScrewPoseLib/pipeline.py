"""The ``run`` command: from a case folder to every screw's pose (result.json).

Stages (DESIGN.md): segmentation (U-Net probabilities per view) → instances per view →
correspondence across views → initial poses (triangulation) → joint 2D/3D refinement →
optional assessment (level, side, breach; needs the case's CT labels) → outputs.

This module never imports the simulator (xray, simulate, planning, training).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import axis_search, correspondence, geometry, instances as instances_mod, pose

__all__ = ["run_case", "result_from_estimates", "label_maps", "write_outputs", "add_run_arguments", "run_command"]

#: The label maps that ``run`` writes (``<view>_labels.png``) are the network's, with each
#: fitted screw's silhouette (the CASE_FORMAT rule: head wins) written over them where the
#: network gives the pixel at least this screw probability (head + shaft).  The 3D fit knows
#: where a screw's metal ends, and which part is head, in a view where the network is unsure:
#: over the vertebral bodies of a lateral view, and where two screws cross.  Above 0 the
#: threshold keeps a wrong fit from painting screw over clear background.  Mean Dice head /
#: shaft of the network's label map -> this one at 0.1 (cached maps, AP + lateral): our tuning
#: cases (20) lateral 0.759 / 0.820 -> 0.850 / 0.873, AP 0.907 / 0.832 -> 0.911 / 0.842; the
#: tall-blunt tuning cases (16) lateral 0.724 / 0.782 -> 0.859 / 0.860, AP 0.931 / 0.842 ->
#: 0.938 / 0.857; the second renderer's prone set (10) lateral 0.887 / 0.886 -> 0.927 / 0.931,
#: AP 0.929 / 0.881 -> 0.946 / 0.915.  0.05-0.3 all gain on every set; the fitted silhouette
#: alone is worse in AP views (0.86 head on ours: the model's head is not the screw's), the
#: network's alone everywhere.
FIT_LABEL_MIN_PROB = 0.1

#: Screws whose silhouettes agree less than this with the segmentation (worst view) are dropped.
#: With true label maps, correct screws fit at 0.88 or better (30 cases); on the network's
#: maps at 0.38-0.9, and wrong pairings spread over 0.1-0.9: 0.4 dropped 40% of the wrong
#: ones and 2 of 82 right ones (10 bench cases, 2 and 3 views).  Set on the probabilities as
#: they are; since the fit uses their square root (pose.TARGET_POWER), fainter foreground counts
#: and confidences are higher.  Re-checked on the 30 pose cases (network, AP + lateral):
#: 0.45-0.65 drop right screws at least as fast as wrong ones (0.6: 18 right, 9 wrong).
MIN_CONFIDENCE = 0.4
#: Candidates whose triangulated pose agrees less than this with the segmentation in the
#: views they were matched in are not refined at all: no correct screw started below 0.35
#: (truth or network maps, 16 bench cases), while 20% of the wrong pairings did.
MIN_INITIAL_CONFIDENCE = 0.3
#: Two screws whose entries (where shaft meets head) are closer than this (mm) are one, however
#: their axes differ: two heads of 7 mm or more (pose.HEAD_DIAMETER_RANGE_MM) cannot sit there.
#: (It replaced a rule with both ends within 3 mm, which it contains.)
#: Two fits of one screw seen nearly end-on in AP can share the entry and part 15-25 deg
#: (their shafts then overlap along less than SAME_SCREW_OVERLAP).  Second renderer, 12 probe
#: cases (4 scenes rendered 3 ways), AP + lateral: precision 0.919 -> 0.979, recall 0.993 ->
#: 1.000; 30 low-profile tuning cases 0.897 -> 0.900; 20 of ours and the 10 voxel bench cases
#: unchanged.
SAME_ENTRY_MM = 5.0
#: Two screws whose metal would overlap along this fraction of the shorter shaft or more (its
#: axis within the summed radii of the other's axis segment) are one as well, which no two real
#: screws can be: the same screw fitted twice, once too short, or once slid along its axis (in an
#: AP + lateral pair a bilateral partner's lateral image lets a fit slide along the AP ray, where
#: the AP view cannot see it).  Which fit stays is settled by :func:`_settle_duplicates`.  At 1.0
#: (the whole shorter shaft) against 0.6, on the 30 pose cases' cached maps, AP + lateral:
#: network precision 0.868 -> 0.887, true labels 0.984 -> 0.987, recall unchanged on both.
SAME_SCREW_OVERLAP = 0.6
#: A fitted screw whose head-to-tip direction is further than this from anterior (world RAS) is
#: no pedicle screw: pedicle trajectories lie within about 45° of it (medial angulation up to
#: ~40°, cranio-caudal tilt up to ~25°; the benchmark's 314 screws: 36° at most), and 70° leaves
#: room for a rotated, scoliotic vertebra.  Such fits are ghosts (an instance paired with the
#: wrong one in the other view): on the 30 pose cases (network, AP + lateral), 23 of 53 false
#: positives and none of 205 correct screws were over the limit.  The same limit already gates
#: the pairings in correspondence (on the line of the triangulated axis, either way round): a
#: ghost refused there no longer takes the instances that the right pairing needs.  30 pose
#: cases (network, AP + lateral, same probabilities): recall 0.758 -> 0.764, precision 0.869 -> 0.882.
MAX_FROM_ANTERIOR_DEG = 70.0
#: A pedicle screw goes in from the back: its head sits on the posterior elements, so the
#: entries of the screws at one height lie at about one depth. A fit whose entry lies further
#: than this in front (world RAS anterior) of the median entry of the other screws within
#: :data:`NEIGHBOUR_HEIGHT_MM` of its height (at least two of them) is a ghost: an instance paired
#: with another screw's in the other view, triangulated out in front of the spine. 30 pose
#: cases, AP + lateral, before this gate: correct screws at most 16 mm in front (network maps) and
#: 17 mm (true maps), 20 mm with the oblique; 4 false positives 55-100 mm in front (network),
#: 2 with the oblique.  With the gate, on the same cached network maps: precision 0.856 -> 0.868
#: (AP + lateral, recall unchanged), 0.932 -> 0.936 (with the oblique, one pair fewer); the
#: benchmark rerun on fresh maps: 0.856 -> 0.859 and 0.939 -> 0.943, recall unchanged.
MAX_ENTRY_ANTERIOR_MM = 30.0
NEIGHBOUR_HEIGHT_MM = 40.0
#: A pedicle screw enters the pedicle, beside the spine's midline: a fit whose entry lies further
#: than this (mm, world RAS right-left) from the midline of the other screws within
#: :data:`NEIGHBOUR_HEIGHT_MM` of its height (at least two of them; the midline half-way between
#: the leftmost and the rightmost) is a ghost: a speck in one view paired with the pixels of real
#: screws in the other.  The worst such fit goes first, then the midline is found again without
#: it.  The simulator's 2066 true screws (all benchmark and tuning sets, misplaced ones included)
#: lie at most 35 mm from it, the pipeline's 732 correct screws on five tuning and benchmark
#: sets at most 38 mm (network maps, AP + lateral); 5 of its 73 false screws there lie at 50-118
#: mm, and no correct one.
MAX_LATERAL_FROM_MIDLINE_MM = 50.0
#: The screws of one region of the spine run nearly parallel: a level's two converge by twice
#: their medial angle (up to ~40° each), and a rotated or scoliotic vertebra turns both.  A fit
#: whose axis lies further than this from the mean direction of the other screws within
#: :data:`NEIGHBOUR_HEIGHT_MM` of its height (at least two of them) is a ghost: an axis drawn
#: across the level, from one screw's head to the other's shaft, where the left and right screws
#: superimpose in the lateral view.  The worst goes first, then the others are judged again.
#: Our 20 tuning cases (network, AP + lateral): true screws at most 38° from their neighbours'
#: mean direction, correct fits at most 40°, false ones at most 33°; the demo's five false
#: screws 39-87°, four of them over 50° (judged again after each drop, three go).
MAX_FROM_NEIGHBOURS_DEG = 50.0


def run_case(case, out_dir=None, device="cpu", probabilities=None, model=None, scene=False,
             assess=True, progress=None, precision=None, with_labels: bool = False):
    """Find every screw of ``case`` (an ``io.Case``) and return the result.json dict.

    ``probabilities``: per view ``float32 [3, v, u]`` (background, head, shaft) to use
    instead of the network (tests and benchmarks feed true label maps one-hot, to separate
    segmentation from geometry errors).  ``model``: a loaded segmentation model (else the
    shipped one is loaded).  ``out_dir``: when given, the outputs are written there
    (see :func:`write_outputs`); nothing is written inside the case folder.
    ``progress``: optional callable taking a stage name.  ``precision``: the network's
    arithmetic (``segmentation.segment``; default auto).  ``with_labels``: return
    ``(result, labels)`` instead, with the label map of each view as ``run`` writes it
    (:func:`label_maps`).
    """
    t_start = time.perf_counter()
    timing = {}
    views = list(case.views)
    if len(views) < 2:
        raise ValueError(f"{getattr(case, 'root', 'case')}: need at least two views, got {len(views)}")
    say = progress or (lambda stage: None)

    # 1. Segmentation.
    say("segmentation")
    t = time.perf_counter()
    if probabilities is None:
        from . import segmentation  # noqa: PLC0415  (imports torch/monai only when needed)

        if model is None:
            model = segmentation.load_model(device=device)
        probabilities = segmentation.segment_views(views, case.images, model=model, device=device,
                                                   precision=precision)
    probabilities = _check_probabilities(probabilities, views)
    timing["segmentation"] = time.perf_counter() - t

    # 2. Instances per view.
    say("instances")
    t = time.perf_counter()
    centre = correspondence.scene_centre(views)
    per_view = [
        instances_mod.find_instances(p, i, mm_per_px=correspondence.mm_per_px_at(v, centre))
        for i, (p, v) in enumerate(zip(probabilities, views))
    ]
    timing["instances"] = time.perf_counter() - t

    # 3. Correspondence.
    say("correspondence")
    t = time.perf_counter()
    fields = [_field_of(img, p.shape[1:]) for img, p in zip(getattr(case, "images", None) or [None] * len(views),
                                                         probabilities)]
    matches, unmatched = correspondence.match_instances(views, per_view, probabilities, fields=fields,
                                                        axis_prior=(pose.ANTERIOR, MAX_FROM_ANTERIOR_DEG))
    timing["correspondence"] = time.perf_counter() - t

    # 4. Pose: triangulation, joint refinement, clean-up.
    say("pose")
    t = time.perf_counter()
    implants = list(getattr(case, "implants", None) or [])
    estimates = pose.initial_poses(views, per_view, matches, implants=implants)
    estimates = _gate(views, probabilities, estimates, device)
    timing["initial_pose"] = time.perf_counter() - t
    t2 = time.perf_counter()
    estimates = pose.refine_poses(views, probabilities, estimates, implants=implants, device=device)
    kept = _clean(estimates, views, probabilities, device)
    if len(kept) != len(estimates) and kept:
        # Screws dropped: refit the rest once, briefly, without them pulling.
        kept = pose.refine_poses(views, probabilities, kept, implants=implants, device=device,
                                 stages_free=pose.STAGES_FREE[-1:], stages_fixed=pose.STAGES_FIXED)
        kept = _clean(kept, views, probabilities, device)
    timing["refinement"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    kept = _second_look(views, probabilities, per_view, kept, fields, implants, device)
    timing["second_look"] = time.perf_counter() - t2
    timing["pose"] = time.perf_counter() - t

    result = result_from_estimates(views, kept, per_view, unmatched)

    # 5. Assessment where the case has vertebra labels (optional module, owned elsewhere).
    if assess and getattr(case, "labels_path", None) is not None and result["screws"]:
        t = time.perf_counter()
        result["screws"] = _assess(case, result["screws"])
        timing["assessment"] = time.perf_counter() - t

    labels = None
    if out_dir is not None or with_labels:
        t = time.perf_counter()
        labels = label_maps(views, probabilities, kept, device=device)
        timing["labels"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t_start
    result["timing_s"] = {k: round(float(v), 4) for k, v in timing.items()}
    if out_dir is not None:
        say("outputs")
        t = time.perf_counter()
        write_outputs(out_dir, case, result, probabilities, kept, scene=scene, labels=labels)
        result["timing_s"]["outputs"] = round(time.perf_counter() - t, 4)
        # result.json carries the output time too.
        from . import io  # noqa: PLC0415

        io.write_result(out_dir, result)
    return (result, labels) if with_labels else result


def _field_of(image, shape):
    """The image's exposed field (bool [v, u]) or None (no image, or another size)."""
    if image is None:
        return None
    arr = np.asarray(image)
    if arr.ndim != 2 or arr.shape != tuple(shape):
        return None
    from .segmentation import field_mask  # noqa: PLC0415  (numpy/scipy only)

    return field_mask(arr)


def _check_probabilities(probabilities, views):
    probs = list(probabilities)
    if len(probs) != len(views):
        raise ValueError(f"probabilities: {len(probs)} maps for {len(views)} views")
    out = []
    for p, v in zip(probs, views):
        p = np.asarray(p, np.float32)
        if p.shape != (3, v.height, v.width):
            raise ValueError(f"probabilities of view {v.name!r}: shape {p.shape}, expected (3, {v.height}, {v.width})")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"probabilities of view {v.name!r} contain NaN or infinite values")
        out.append(p)
    return out


def _gate(views, probabilities, estimates, device):
    """Keep the candidates worth refining: the silhouette of the triangulated screw agrees
    with the segmentation in each view it was matched in (views without an instance do not
    count: the screw may lie outside them)."""
    if not estimates:
        return estimates
    scored = pose.confidences(views, probabilities, estimates, device=device)
    keep = []
    for e, s in zip(estimates, scored):
        member = [s.view_confidence[k] for k in e.members] if e.members else s.view_confidence
        if min(member) >= MIN_INITIAL_CONFIDENCE:
            keep.append(e)
    return keep


def _clean(estimates, views=None, probabilities=None, device="cpu"):
    """Drop screws that do not fit the images, that point where no pedicle screw can
    (:data:`MAX_FROM_ANTERIOR_DEG`), whose head lies in front of the spine
    (:data:`MAX_ENTRY_ANTERIOR_MM`) or far to its side (:data:`MAX_LATERAL_FROM_MIDLINE_MM`),
    that run across their neighbours (:data:`MAX_FROM_NEIGHBOURS_DEG`), and duplicates.  Of two
    fits of one screw the one with the higher confidence stays; with ``views`` and
    ``probabilities`` given, confidences judged fairly (see :func:`_settle_duplicates`)."""
    min_anterior = np.cos(np.radians(MAX_FROM_ANTERIOR_DEG))
    good = [e for e in estimates if e.confidence >= MIN_CONFIDENCE and float(e.axis @ pose.ANTERIOR) >= min_anterior]
    good = [e for e, ahead in zip(good, _entry_ahead_of_neighbours_mm(good)) if not ahead > MAX_ENTRY_ANTERIOR_MM]
    good = _without_lateral_outliers(good)
    good = _without_direction_outliers(good)
    good.sort(key=lambda e: -e.confidence)
    kept, rivals = [], []
    for e in good:
        same = next((i for i, k in enumerate(kept) if _same_screw(e, k)), None)
        if same is not None:
            rivals[same].append(e)
            continue
        kept.append(e)
        rivals.append([])
    if views is not None and probabilities is not None:
        kept = _settle_duplicates(kept, rivals, views, probabilities, device)
    return kept


def _second_look(views, probabilities, per_view, kept, fields, implants, device):
    """Search each fitted screw's axis again from its head, and look for screws at head blobs that
    no fitted screw explains (:mod:`axis_search`); refine those candidates with the rest, keep an
    alternative only where it fits the images better than the screw it would replace (judged
    among the other screws, as :func:`_settle_duplicates` does), then clean up.

    Tuning cases (20, seeds ``bench_pose.TUNING_SEED_BASE + i``, apart from the test set;
    shipped network, cached maps): AP + lateral, recall 0.800 -> 0.815 and precision
    0.889 -> 0.911 (mostly screws whose instance ran into a neighbour's shaft or a wire: a head
    in place and a tip 10-40 mm off); with the oblique, 0.770 -> 0.820 and 0.928 -> 0.948.
    The candidates are refined by themselves (refining them with all the kept screws did no
    better: 0.820 / 0.911 with AP + lateral, at three times the cost); median 1.2 s per case
    on one thread with AP + lateral, 1.9 s with the oblique."""
    if not kept and not any(len(v) for v in per_view):
        return kept
    alts = axis_search.alternatives(views, probabilities, kept, fields, MAX_FROM_ANTERIOR_DEG)
    new = axis_search.estimates_from_heads(views, probabilities, per_view, kept, fields, implants,
                                           MAX_FROM_ANTERIOR_DEG)
    new = _gate(views, probabilities, new, device)
    if not new and all(a is None for a in alts):
        return kept
    todo = [a for a in alts if a is not None] + new
    refined = iter(pose.refine_poses(views, probabilities, todo, implants=implants, device=device))
    chosen = []
    for i, (e, a) in enumerate(zip(kept, alts)):
        if a is None:
            chosen.append(e)
            continue
        a = next(refined)
        others = kept[:i] + kept[i + 1:]
        before = pose.confidences(views, probabilities, others + [e], device=device)[-1].confidence
        after = pose.confidences(views, probabilities, others + [a], device=device)[-1].confidence
        chosen.append(a if after > before else e)
    return _clean(chosen + list(refined), views, probabilities, device)


def _settle_duplicates(kept, rivals, views, probabilities, device):
    """Of the fits of one screw, keep the one that agrees best with the images among the
    other kept screws.  Their confidences as fitted are no fair judge: each fit's pixels that
    its rival explains are left out of its score (see ``pose._confidences``), so a fit too
    short, inside its rival's silhouette, loses nothing for the metal it leaves unexplained.
    30 pose cases, AP + lateral, cached maps: with true labels recall 0.962 -> 0.968 and
    precision 0.977 -> 0.984 (bilateral screws whose lengths had been swapped); network maps
    unchanged.  Costs one confidence rendering per fit in a group, rarely more than a few."""
    out = list(kept)
    for i, group in enumerate(rivals):
        if not group:
            continue
        others = out[:i] + out[i + 1:]
        best, best_conf = out[i], -1.0
        for c in [out[i]] + group:
            conf = pose.confidences(views, probabilities, others + [c], device=device)[-1].confidence
            if conf > best_conf + 1e-9:
                best, best_conf = c, conf
        out[i] = best
    return out


def _height_neighbours(estimates):
    """``(entries [n, 3] world RAS mm, masks)``: per screw, the bool mask of the other screws
    whose entry lies within :data:`NEIGHBOUR_HEIGHT_MM` of its height (superior), or None with
    fewer than two of them (too few to judge it against)."""
    entries = np.array([e.entry_mm for e in estimates], float).reshape(-1, 3)
    height = entries @ pose.SUPERIOR
    near = np.abs(height[:, None] - height[None, :]) <= NEIGHBOUR_HEIGHT_MM
    np.fill_diagonal(near, False)
    return entries, [m if m.sum() >= 2 else None for m in near]


def _entry_ahead_of_neighbours_mm(estimates) -> list[float]:
    """Per screw: how far (mm, world RAS anterior) its entry lies in front of the median entry of
    its height neighbours (:func:`_height_neighbours`); NaN where it has too few."""
    entries, masks = _height_neighbours(estimates)
    depth = entries @ pose.ANTERIOR
    return [float("nan") if m is None else float(depth[i] - np.median(depth[m])) for i, m in enumerate(masks)]


def _lateral_from_midline_mm(estimates) -> list[float]:
    """Per screw: how far (mm, world RAS right-left) its entry lies from the midline of its height
    neighbours (half-way between the leftmost and the rightmost of them); NaN where it has too few."""
    entries, masks = _height_neighbours(estimates)
    lateral = entries[:, 0]
    return [float("nan") if m is None else float(abs(lateral[i] - 0.5 * (lateral[m].min() + lateral[m].max())))
            for i, m in enumerate(masks)]


def _without_outliers(estimates, measure, limit) -> list:
    """``estimates`` less the fits whose ``measure`` (a function of all the fits, one value per
    fit, NaN where it cannot judge) exceeds ``limit``, the worst first and measured again
    without it: a far ghost would skew what the others are judged against."""
    kept = list(estimates)
    while len(kept) >= 3:
        off = np.array(measure(kept))
        if np.all(np.isnan(off)) or not np.nanmax(off) > limit:
            break
        kept.pop(int(np.nanargmax(off)))
    return kept


def _without_lateral_outliers(estimates) -> list:
    """``estimates`` less the fits whose entry lies beyond :data:`MAX_LATERAL_FROM_MIDLINE_MM`
    from the midline, the worst first (a far ghost would widen the others' midline)."""
    return _without_outliers(estimates, _lateral_from_midline_mm, MAX_LATERAL_FROM_MIDLINE_MM)


def _angle_from_neighbours_deg(estimates) -> list[float]:
    """Per screw: the angle (degrees) between its axis and the mean axis of its height neighbours
    (:func:`_height_neighbours`); NaN where it has too few."""
    _, masks = _height_neighbours(estimates)
    axes = np.array([e.axis for e in estimates], float).reshape(-1, 3)
    out = []
    for i, m in enumerate(masks):
        mean = None if m is None else axes[m].sum(axis=0)
        if mean is None or not np.linalg.norm(mean) > 0:
            out.append(float("nan"))
            continue
        cos = float(np.clip(axes[i] @ (mean / np.linalg.norm(mean)), -1.0, 1.0))
        out.append(float(np.degrees(np.arccos(cos))))
    return out


def _without_direction_outliers(estimates) -> list:
    """``estimates`` less the fits whose axis lies beyond :data:`MAX_FROM_NEIGHBOURS_DEG` from
    their neighbours' mean axis, the worst first (a ghost would tilt the others' mean)."""
    return _without_outliers(estimates, _angle_from_neighbours_deg, MAX_FROM_NEIGHBOURS_DEG)


def _same_screw(a, b) -> bool:
    """Whether two fitted screws are one: entries within :data:`SAME_ENTRY_MM`, or their metal
    overlapping along :data:`SAME_SCREW_OVERLAP` or more of the shorter shaft (its axis within
    the summed radii of the other's axis segment), which no two real screws do."""
    if np.linalg.norm(a.entry_mm - b.entry_mm) < SAME_ENTRY_MM:
        return True
    reach = 0.5 * (float(a.diameter_mm) + float(b.diameter_mm))
    short, long_ = (a, b) if a.length_mm <= b.length_mm else (b, a)
    s = np.linspace(0.0, 1.0, 11)[:, None]
    along = short.entry_mm[None] * (1 - s) + short.tip_mm[None] * s
    d = geometry.point_segment_distance(along, long_.entry_mm, long_.tip_mm)
    return bool(np.mean(d < reach) >= SAME_SCREW_OVERLAP)


def result_from_estimates(views, estimates, per_view=None, unmatched=()) -> dict:
    """result.json dict (CASE_FORMAT.md) from refined screws; ids S1.. from head to feet, right to left."""
    order = sorted(estimates, key=lambda e: (-round(float(e.entry_mm[2]) / 10.0), -float(e.entry_mm[0])))
    screws = []
    for i, e in enumerate(order, start=1):
        entry = np.asarray(e.entry_mm, float)
        tip = np.asarray(e.tip_mm, float)
        vd = {}
        for v in views:
            uv = geometry.project(v.P, np.array([entry, tip]))
            vd[v.name] = {"entry_px": [round(float(x), 2) for x in uv[0]],
                          "tip_px": [round(float(x), 2) for x in uv[1]]}
        screws.append({
            "id": f"S{i}",
            "entry_mm": [round(float(x), 4) for x in entry],
            "tip_mm": [round(float(x), 4) for x in tip],
            "diameter_mm": round(float(e.diameter_mm), 3),
            "length_mm": round(float(e.length_mm), 3),
            "transform": [[round(float(x), 6) for x in row] for row in pose.pose_matrix(entry, tip)],
            "confidence": round(float(e.confidence), 4),
            "views": vd,
        })
    un = []
    for u in unmatched:
        inst = per_view[u.view_index][u.instance_index]
        if _explained(views[u.view_index], inst, order):
            continue  # a refined screw lies along it (a piece of a found screw)
        un.append({
            "view": views[u.view_index].name,
            "entry_px": [round(float(x), 2) for x in inst.head_end_px],
            "tip_px": [round(float(x), 2) for x in inst.tip_px],
            "reason": u.reason,
        })
    return {"format": "pedicle-screw-result/1", "screws": screws, "unmatched": un}


def _explained(view, inst, estimates) -> bool:
    for e in estimates:
        ends = geometry.project(view.P, np.array([e.entry_mm - e.axis * e.head_height_mm, e.tip_mm]))
        tol = max(inst.head_radius_px, inst.width_px, 4.0)
        d = geometry.point_segment_distance([inst.head_end_px, np.asarray(inst.tip_px, float)], *ends)
        if np.all(d <= tol):
            return True
    return False


def _assess(case, screws):
    """Level, side and breach from the case's CT and labels, when the assessment module is there."""
    try:
        from . import assessment, ct as ctmod  # noqa: PLC0415
    except ImportError:
        return screws
    labels = ctmod.load_labels(case.labels_path, names=getattr(case, "label_names", None) or None)
    ct_vol = ctmod.load_volume(case.ct_path) if getattr(case, "ct_path", None) is not None else None
    return assessment.assess_screws(screws, ct_vol, labels)


# ------------------------------------------------------------------------------------- outputs


def label_maps(views, probabilities, estimates, min_prob: float = FIT_LABEL_MIN_PROB, device="cpu") -> list:
    """The label map of each view (uint8 ``[v, u]``: 0 background, 1 head, 2 shaft): the
    network's (``segmentation.labels_from_probabilities``), overwritten by the fitted screws'
    silhouettes (``pose.render_labels``) where ``probabilities`` give head + shaft of at least
    ``min_prob`` (see :data:`FIT_LABEL_MIN_PROB`).  Screws seen in one view only, which have no
    fit, keep the network's labels."""
    out = []
    for view, p in zip(views, probabilities):
        labels = _labels_from_probabilities(p)
        if estimates:
            fit = pose.render_labels(view, estimates, device=device)
            over = (fit > 0) & (p[1] + p[2] >= min_prob)
            labels[over] = fit[over]
        out.append(labels)
    return out


def write_outputs(out_dir, case, result, probabilities, estimates, scene=False, labels=None) -> Path:
    """Write result.json, per view ``<view>_labels.png``, ``<view>_overlay.png`` (the label map
    over the X-ray) and ``<view>_fit.png`` (fitted screw outlines over the X-ray), plus
    report/scene hooks.  ``labels``: the views' label maps (default :func:`label_maps`)."""
    from . import io  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_result(out_dir, result)
    if labels is None:
        labels = label_maps(case.views, probabilities, estimates)
    label_maps_by_view = {}
    for view, image, lab in zip(case.views, case.images, labels):
        label_maps_by_view[view.name] = lab
        base = io.safe_view_filename(view.name)
        io.write_png(out_dir / f"{base}_labels.png", lab)
        io.write_png(out_dir / f"{base}_overlay.png", _overlay(image, lab))
        io.write_png(out_dir / f"{base}_fit.png", fit_picture(image, view, estimates))
    # Report and Slicer scene: modules owned elsewhere; used when present.
    try:
        from . import report  # noqa: PLC0415

        if hasattr(report, "write_report"):
            report.write_report(out_dir, case, result)
    except ImportError:
        pass
    if scene:
        from . import mrml  # noqa: PLC0415

        mrml.write_scene_for_run(out_dir, case, result, label_maps=label_maps_by_view)
    return out_dir


def _labels_from_probabilities(p):
    try:
        from .segmentation import labels_from_probabilities  # noqa: PLC0415

        return np.asarray(labels_from_probabilities(p), np.uint8)
    except ImportError:
        return np.argmax(p, axis=0).astype(np.uint8)


def _grey(image):
    arr = np.asarray(image, np.float32)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = np.percentile(arr[finite], [0.5, 99.5])
    g = np.clip((np.where(finite, arr, lo) - lo) / max(float(hi - lo), 1e-6), 0, 1)
    return (g * 255 + 0.5).astype(np.uint8)


def _overlay(image, labels):
    try:
        from .segmentation import overlay  # noqa: PLC0415

        return overlay(image, labels)
    except ImportError:
        g = _grey(image)
        rgb = np.repeat(g[..., None], 3, 2)
        rgb[labels == 1] = (255, 140, 0)
        rgb[labels == 2] = (0, 200, 255)
        return rgb


FIT_COLOURS = ((255, 60, 60), (60, 255, 60), (80, 160, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255))


def fit_picture(image, view, estimates) -> np.ndarray:
    """RGB uint8: the X-ray with each fitted screw's silhouette outline and axis drawn in colour."""
    from PIL import Image, ImageDraw  # noqa: PLC0415
    from scipy import ndimage  # noqa: PLC0415

    rgb = np.repeat(_grey(image)[..., None], 3, 2)
    for k, e in enumerate(estimates):
        lab = pose.render_labels(view, [e])
        m = lab > 0
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = FIT_COLOURS[k % len(FIT_COLOURS)]
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    for k, e in enumerate(estimates):
        (u0, v0), (u1, v1) = geometry.project(view.P, np.array([e.entry_mm, e.tip_mm]))
        c = FIT_COLOURS[k % len(FIT_COLOURS)]
        draw.line([(u0, v0), (u1, v1)], fill=c, width=1)
        draw.ellipse([u0 - 2, v0 - 2, u0 + 2, v0 + 2], outline=c)
    return np.asarray(im)


# ------------------------------------------------------------------------------------- CLI


def add_run_arguments(parser) -> None:
    parser.add_argument("case_dir", help="case folder (case.json + images)")
    parser.add_argument("--out", required=True, help="output folder (must not be inside the case folder)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    parser.add_argument("--weights", default=None, help="segmentation weights (default: the shipped model)")
    parser.add_argument("--scene", action="store_true", help="also write a Slicer scene (scene.mrb)")
    parser.add_argument("--truth-labels", action="store_true",
                        help="use the case's truth/<view>_labels.png instead of the network (geometry check)")
    parser.add_argument("--overwrite", action="store_true", help="replace a result already in --out")
    from .segmentation import add_precision_argument  # noqa: PLC0415  (numpy-only at import)

    add_precision_argument(parser)


def run_command(args) -> int:
    from . import io  # noqa: PLC0415

    case_dir = Path(args.case_dir)
    out = Path(args.out)
    if not case_dir.exists():
        raise FileNotFoundError(f"case folder {case_dir} does not exist")
    io.ensure_output_dir_outside(out, case_dir)
    if (out / "result.json").exists() and not args.overwrite:
        raise FileExistsError(f"{out / 'result.json'} already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if args.device.startswith("cuda"):
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    case = io.read_case(case_dir)
    probabilities, model = None, None
    if args.truth_labels:
        probabilities = []
        for v in case.views:
            lab = io.read_truth_labels(case_dir, v.name)
            probabilities.append(one_hot(lab))
    else:
        from . import segmentation  # noqa: PLC0415

        model = segmentation.load_model(args.weights, device=args.device)
    _limit_threads()

    # Everything is written into a temporary folder beside --out, then moved in place:
    # a failure leaves no partial result.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        result = run_case(case, out_dir=tmp, device=args.device, probabilities=probabilities, model=model,
                          scene=args.scene, precision=getattr(args, "precision", None))
        _move_into(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    n = len(result["screws"])
    print(f"{n} screw{'s' if n != 1 else ''} found, {len(result['unmatched'])} unmatched instance(s); "
          f"{result['timing_s']['total']:.2f} s -> {out / 'result.json'}")
    for s in result["screws"]:
        extra = f" {s.get('level', '')} {s.get('side', '')}".rstrip()
        print(f"  {s['id']}: entry {np.round(s['entry_mm'], 1).tolist()} tip {np.round(s['tip_mm'], 1).tolist()} "
              f"{s['diameter_mm']:g}x{s['length_mm']:g} mm conf {s['confidence']:.2f}{extra}")
    return 0


def one_hot(labels) -> np.ndarray:
    """uint8 label map [v,u] (0/1/2) → float32 [3, v, u] probabilities."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"label map must be 2D, got shape {lab.shape}")
    return np.stack([(lab == k) for k in range(3)]).astype(np.float32)


def _move_into(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    # result.json last, so a reader never sees a new result beside stale pictures.
    for p in sorted(tmp.iterdir(), key=lambda x: (x.name == "result.json", x.name)):
        target = out / p.name
        if target.is_dir() and not p.is_dir():
            shutil.rmtree(target)
        if p.is_dir():
            if target.exists():
                shutil.rmtree(target)
            os.replace(p, target)
        else:
            os.replace(p, target)
    shutil.rmtree(tmp, ignore_errors=True)


def _limit_threads():
    import torch  # noqa: PLC0415

    if torch.get_num_threads() > 2 and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(2)
