"""One self-contained ``report.html`` of a run: screw table, X-rays with the screws drawn, 3D picture, summary.

The file has no external references (inline CSS, images as base64 PNG data
URIs, no scripts), so it opens in any browser with no network, can be mailed
and archived. Screws are coloured by Gertzbein-Robbins grade
(:data:`assessment.GRADE_COLORS`: A green, B yellow-green, C orange, D red,
E dark red; grey when not assessed). Each X-ray shows every fitted screw
projected with its view's ``P``: the shaft's two outline lines at +- the outer
radius (perpendicular to the axis and to the ray through the screw), the
conical tip and the tulip head.

:func:`table_columns` / :func:`table_rows` give the screw table's columns and
rows as plain values, so other front ends (the Slicer table node) show the
same table.
"""
from __future__ import annotations

import base64
import html
import io as _pyio
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from . import geometry
from .assessment import GRADE_COLORS, GRADES

__all__ = ["write_report", "table_columns", "table_rows", "draw_screws_on_image", "REPORT_NAME"]

REPORT_NAME = "report.html"
#: Longest side (px) of an X-ray picture in the report.
MAX_IMAGE_PX = 900

# (key, header, unit, description)
_COLUMNS = (
    ("id", "Screw", "", "screw id in result.json"),
    ("level", "Level", "", "vertebra holding most of the shaft"),
    ("side", "Side", "", "patient's side, from the vertebra's own frame"),
    ("size", "Size", "mm", "outer diameter x shaft length"),
    ("diameter_mm", "Diameter", "mm", "outer (thread) diameter"),
    ("length_mm", "Length", "mm", "shaft length, entry to tip"),
    ("transverse_angle_deg", "Medial angle", "deg", "transverse angle; + converges to the midline"),
    ("sagittal_angle_deg", "Sagittal angle", "deg", "angle to the endplates; + points cranially"),
    ("entry_offset_mm", "Pedicle offset", "mm", "axis distance from the pedicle isthmus centre"),
    ("breach_mm", "Breach", "mm", "how far the outer surface goes outside the bone"),
    ("grade", "Grade", "", "Gertzbein-Robbins: A none, B <2, C 2-4, D 4-6, E >6 mm"),
    ("grade_range", "Grade range", "", "grades within the pose uncertainty"),
    ("direction", "Direction", "", "where the screw is out (vertebra frame)"),
    ("medial_flag", "Medial", "", "breaches medially, towards the spinal canal"),
    ("confidence", "Confidence", "", "pose confidence 0..1"),
)


# ----------------------------------------------------------------------------- table
def table_columns() -> list[dict]:
    """The screw table's columns: ``key``, ``header``, ``unit`` ("mm", "deg" or ""), ``description``."""
    return [{"key": k, "header": h, "unit": u, "description": d} for k, h, u, d in _COLUMNS]


def table_rows(result: dict) -> list[dict]:
    """One row per screw of ``result`` (result.json dict), keys as :func:`table_columns`.

    Values are plain: str, float (rounded), bool or None (not assessed). Order:
    screws with a medial breach first (they face the canal), then cranial to
    caudal, left before right.
    """
    from .assessment import level_index

    screws = _screws(result)
    rows = []
    for s in screws:
        b = s.get("breach") if isinstance(s.get("breach"), dict) else {}
        t = s.get("trajectory") if isinstance(s.get("trajectory"), dict) else {}
        d, L = _num(s.get("diameter_mm")), _num(s.get("length_mm"))
        rng = b.get("grade_range") or [None, None]
        rows.append({
            "id": str(s.get("id", "")),
            "level": s.get("level"),
            "side": s.get("side"),
            "size": f"{round(d, 1):g} x {round(L, 1):g}" if d is not None and L is not None else None,
            "diameter_mm": _round(d, 2),
            "length_mm": _round(L, 1),
            "transverse_angle_deg": _round(t.get("transverse_angle_deg"), 1),
            "sagittal_angle_deg": _round(t.get("sagittal_angle_deg"), 1),
            "entry_offset_mm": _round(t.get("entry_offset_mm"), 1),
            "breach_mm": _round(b.get("max_mm"), 1),
            "grade": b.get("grade"),
            "grade_range": (f"{rng[0]}-{rng[1]}" if rng[0] and rng[1] and rng[0] != rng[1] else rng[0]),
            "direction": b.get("direction"),
            "medial_flag": bool(b.get("medial_flag")) if b else None,
            "confidence": _round(s.get("confidence"), 2),
        })

    def order(r):
        li = level_index(r["level"]) if r["level"] else None
        return (0 if r["medial_flag"] else 1, 999 if li is None else li, {"left": 0, "right": 1}.get(r["side"], 2), r["id"])

    return sorted(rows, key=order)


# ----------------------------------------------------------------------------- report
def write_report(out_dir, case, result: dict, images=None, views=None, ct=None, labels=None,
                 title: str | None = None, render_3d: bool = True) -> Path:
    """Write ``out_dir/report.html`` (atomically) and return its path.

    ``case``: an ``io.Case`` (its views, images, CT and labels are used where
    the arguments below are None) or None. ``result``: the result.json dict
    (screws with ``level``/``side``/``breach``/``trajectory`` where assessed,
    ``unmatched``, ``timing_s``). ``images``: float arrays ``[v, u]`` per
    view (larger = brighter); ``views``: ``geometry.View`` per image (their
    ``P`` draws the screws). ``ct``/``labels``: ``ct.Volume``/``ct.LabelVolume``
    for the 3D picture. ``render_3d=False`` leaves the 3D picture out.
    """
    if not isinstance(result, dict) or not isinstance(result.get("screws", []), list):
        raise ValueError("write_report: result must be a result.json dict with a 'screws' list")
    out_dir = Path(out_dir)
    if case is not None:
        images = images if images is not None else getattr(case, "images", None)
        views = views if views is not None else getattr(case, "views", None)
    images = list(images or [])
    views = list(views or [])
    if images and len(images) != len(views):
        raise ValueError(f"write_report: {len(images)} images but {len(views)} views; give one view per image")
    screws = _screws(result)
    name = title or (Path(case.root).name if case is not None and getattr(case, "root", None) else "case")

    parts = [_head(name), f"<h1>Pedicle screw report: {_e(name)}</h1>"]
    parts.append(_summary_html(result, screws))
    parts.append(_table_html(result))
    if images:
        parts.append("<h2>X-rays with the fitted screws</h2><div class='views'>")
        for i, (img, view) in enumerate(zip(images, views)):
            png = _png_bytes(draw_screws_on_image(img, view, screws))
            vname = getattr(view, "name", f"view {i + 1}")
            parts.append(f"<figure class='view'><img class='xray' alt='{_e(vname)} with screws' "
                         f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                         f"<figcaption>{_e(vname)}</figcaption></figure>")
        parts.append("</div>")
    if render_3d:
        pic, how = _picture_3d(case, result, screws, ct, labels)
        if pic is not None:
            parts.append("<h2>3D view</h2><figure class='scene'><img class='scene3d' alt='vertebrae and screws' "
                         f"src='data:image/png;base64,{base64.b64encode(pic).decode()}'>"
                         f"<figcaption>vertebrae and screws (posterior oblique; {_e(how)})</figcaption></figure>")
    parts.append(_legend_html())
    parts.append("</body></html>\n")
    data = "\n".join(parts).encode("utf-8")
    return _write_atomic(out_dir / REPORT_NAME, data)


# ----------------------------------------------------------------------------- drawing
def draw_screws_on_image(image, view, screws, max_px: int = MAX_IMAGE_PX) -> np.ndarray:
    """RGB uint8 picture of ``image`` (float ``[v, u]``, windowed 1-99.5 %) with ``screws`` drawn.

    ``view``: ``geometry.View`` (its ``P``); ``screws``: result screw entries. The
    picture is drawn at full size and shrunk to ``max_px`` on its longer side.
    """
    from PIL import Image, ImageDraw

    a = np.asarray(image, np.float32)
    if a.ndim != 2:
        raise ValueError(f"draw_screws_on_image: image must be 2D [v, u], got shape {a.shape}")
    finite = a[np.isfinite(a)]
    lo, hi = (np.percentile(finite, [1.0, 99.5]) if finite.size else (0.0, 1.0))
    g = np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1)
    grey = (g * 255).astype(np.uint8)
    im = Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    H, W = a.shape
    scale = min(1.0, max_px / max(H, W))
    lw = max(1, int(round(2.0 / scale)))
    draw = ImageDraw.Draw(im)
    P = view.P
    src = view.source_mm
    for s in screws:
        outline = _screw_outline(s, src)
        if outline is None:
            continue
        color = _rgb(GRADE_COLORS.get((s.get("breach") or {}).get("grade") if isinstance(s.get("breach"), dict) else None))
        for poly in outline:
            uv = geometry.project(P, poly)
            if not np.all(np.isfinite(uv)):
                continue
            draw.line([tuple(p) for p in uv] + [tuple(uv[0])], fill=color, width=lw)
        label = _short_label(s)
        head_uv = geometry.project(P, outline[1].mean(axis=0))
        if label and np.all(np.isfinite(head_uv)):
            draw.text((float(head_uv[0]) + 4 * lw, float(head_uv[1]) - 6 * lw), label, fill=color,
                      font=_font(max(10, int(12 / scale))))
    if scale < 1.0:
        im = im.resize((max(1, int(round(W * scale))), max(1, int(round(H * scale)))), Image.LANCZOS)
    return np.asarray(im)


def _screw_outline(s, source_mm):
    """World polygons (N,3): the shaft outline (two side lines and the conical tip) and the head's box."""
    try:
        entry = np.asarray(s["entry_mm"], float)
        tip = np.asarray(s["tip_mm"], float)
        d = float(s["diameter_mm"])
    except (KeyError, TypeError, ValueError):
        return None
    axis = tip - entry
    L = float(np.linalg.norm(axis))
    if not (L > 0 and np.all(np.isfinite(axis)) and d > 0):
        return None
    axis /= L
    ray = 0.5 * (entry + tip) - np.asarray(source_mm, float)
    n = np.cross(axis, ray)
    if np.linalg.norm(n) < 1e-9:  # screw seen end-on: any perpendicular
        n = np.cross(axis, [1.0, 0.0, 0.0] if abs(axis[0]) < 0.9 else [0.0, 1.0, 0.0])
    n /= np.linalg.norm(n)
    r = 0.5 * d
    tip_len = float(np.clip(0.6 * d, 2.5, 5.0))
    cone = tip - min(tip_len, 0.9 * L) * axis
    shaft = np.array([entry + r * n, cone + r * n, tip, cone - r * n, entry - r * n])
    head_d = float(np.clip(d + 5.0, 10.5, 13.0))  # screw.ScrewSpec.from_size proportions
    head_h = 0.55 * head_d + 7.5
    R = 0.5 * head_d
    top = entry - head_h * axis
    head = np.array([entry + R * n, top + R * n, top - R * n, entry - R * n])
    return [shaft, head]


# ----------------------------------------------------------------------------- html pieces
_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td.t{text-align:left}tr.medial td{background:#fdecea}
.chip{display:inline-block;min-width:18px;padding:1px 6px;border-radius:4px;color:#fff;font-weight:bold;text-align:center}
.summary span.count{margin-right:12px}.warn{color:#b00020;font-weight:bold}
.views{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figcaption{font-size:13px;color:#555}
img.xray{max-width:560px;height:auto;border:1px solid #999}img.scene3d{max-width:800px;height:auto;border:1px solid #ccc}
.legend span{margin-right:10px;font-size:13px}.small{font-size:12px;color:#666}
"""


def _head(name):
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Pedicle screw report: {_e(name)}</title><style>{_CSS}</style></head><body>")


def _summary_html(result, screws):
    counts = {g: 0 for g in GRADES}
    unassessed = 0
    for s in screws:
        g = (s.get("breach") or {}).get("grade") if isinstance(s.get("breach"), dict) else None
        if g in counts:
            counts[g] += 1
        else:
            unassessed += 1
    out = ["<h2>Summary</h2><div class='summary'>", f"<p>{len(screws)} screw(s) found"]
    unmatched = result.get("unmatched") or []
    if unmatched:
        out.append(f"; {len(unmatched)} instance(s) seen in one view only (not matched)")
    out.append(".</p><p>")
    for g in GRADES:
        out.append(f"<span class='count'>{_chip(g)} {counts[g]}</span>")
    if unassessed:
        out.append(f"<span class='count'>{_chip(None, '?')} {unassessed} not assessed (no CT labels)</span>")
    out.append("</p>")
    medial = [r for r in table_rows(result) if r["medial_flag"]]
    if medial:
        items = ", ".join(f"{_e(r['level'] or r['id'])} {_e(r['side'] or '')} (grade {_e(r['grade'])}, "
                          f"{r['breach_mm']} mm)" for r in medial)
        out.append(f"<p class='warn'>Medial breach (towards the spinal canal): {items}</p>")
    uncertain = [r for r in table_rows(result) if r["grade_range"] and "-" in str(r["grade_range"])]
    if uncertain:
        out.append("<p>Grade uncertain within the pose's uncertainty: "
                   + ", ".join(f"{_e(r['id'])} ({_e(r['grade_range'])})" for r in uncertain) + "</p>")
    timing = result.get("timing_s") or {}
    if isinstance(timing, dict) and timing:
        cells = "".join(f"<th>{_e(k)}</th>" for k in timing)
        vals = "".join(f"<td>{_fmt(v, 2)}</td>" for v in timing.values())
        out.append(f"<table class='timing'><tr><th>time (s)</th>{cells}</tr><tr><td class='t'>run</td>{vals}</tr></table>")
    out.append("</div>")
    return "".join(out)


def _table_html(result):
    cols = table_columns()
    cols = [c for c in cols if c["key"] not in ("diameter_mm", "length_mm")]  # "size" shows both
    out = ["<h2>Screws</h2><table class='screws'><thead><tr>"]
    for c in cols:
        unit = f" ({c['unit']})" if c["unit"] else ""
        out.append(f"<th title='{_e(c['description'])}'>{_e(c['header'] + unit)}</th>")
    out.append("</tr></thead><tbody>")
    for r in table_rows(result):
        cls = " class='medial'" if r["medial_flag"] else ""
        out.append(f"<tr{cls}>")
        for c in cols:
            v = r[c["key"]]
            if c["key"] == "grade":
                out.append(f"<td class='t'>{_chip(v, v or '-')}</td>")
            elif c["key"] == "medial_flag":
                out.append(f"<td class='t'>{'<span class=warn>MEDIAL</span>' if v else ('no' if v is False else '-')}</td>")
            elif isinstance(v, float):
                out.append(f"<td>{_fmt(v, 2 if c['key'] in ('confidence', 'diameter_mm') else 1)}</td>")
            else:
                out.append(f"<td class='t'>{_e('-' if v is None else str(v))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if not result.get("screws"):
        out.append("<p>No screw was found.</p>")
    return "".join(out)


def _legend_html():
    names = {"A": "A: no breach", "B": "B: < 2 mm", "C": "C: 2-4 mm", "D": "D: 4-6 mm", "E": "E: > 6 mm"}
    items = "".join(f"<span>{_chip(g)} {names[g]}</span>" for g in GRADES)
    return (f"<h2>Legend</h2><p class='legend'>{items}<span>{_chip(None, '?')} not assessed</span></p>"
            "<p class='small'>Gertzbein-Robbins grade of how far the screw's outer thread surface lies outside "
            "its vertebra's bone. Side and angles are in each vertebra's own anatomical frame.</p>")


def _chip(grade, text=None):
    return (f"<span class='chip' style='background:{GRADE_COLORS.get(grade, GRADE_COLORS[None])}'>"
            f"{_e(text if text is not None else grade)}</span>")


# ----------------------------------------------------------------------------- 3D
def _picture_3d(case, result, screws, ct, labels):
    """PNG bytes of the 3D scene and how it was drawn, or (None, reason)."""
    if ct is None and labels is None and case is not None:
        try:
            from . import ct as ctmod

            if getattr(case, "labels_path", None):
                labels = ctmod.load_labels(case.labels_path, names=getattr(case, "label_names", None) or None)
            elif getattr(case, "ct_path", None):
                ct = ctmod.load_volume(case.ct_path)
        except (OSError, ValueError):
            pass
    if not screws and labels is None and ct is None:
        return None, "nothing to draw"
    reason = ""
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "scene.png"
        try:
            from . import render3d  # the slicer helper's offscreen VTK picture
        except ImportError:
            render3d = None
        if render3d is not None:
            try:
                pic = render3d.render_scene_png(png, ct=None if labels is not None else ct, labels=labels,
                                                screws=_scene_items(screws), size=(800, 600))
                return png.read_bytes(), f"{pic.renderer} render"
            except (RuntimeError, ValueError, OSError) as exc:
                reason = f" (VTK picture failed: {exc})"
        try:
            _matplotlib_scene(png, screws, labels)
            return png.read_bytes(), "matplotlib" + reason
        except (RuntimeError, ValueError, OSError) as exc:
            return None, f"no 3D picture: {exc}{reason}"


def _scene_items(screws):
    """Screw items for render3d.render_scene_png, coloured as in the table."""
    from .assessment import screw_pose

    items = []
    for i, s in enumerate(screws):
        try:
            T, d, L = screw_pose(s, f"screws[{i}]")
        except ValueError:
            continue
        if s.get("transform") is not None:
            M = np.asarray(s["transform"], float)
            if M.shape == (4, 4) and np.all(np.isfinite(M)):
                T = M  # keeps the roll (the head's slot) the pose found
        g = (s.get("breach") or {}).get("grade") if isinstance(s.get("breach"), dict) else None
        rgb = tuple(c / 255.0 for c in _rgb(GRADE_COLORS.get(g, GRADE_COLORS[None])))
        items.append({"diameter_mm": d, "length_mm": L, "T_world_from_screw": T, "color": rgb,
                      "text": _short_label(s)})
    return items


def _matplotlib_scene(path, screws, labels):
    """Fallback 3D picture: vertebra label points near the screws and the screws as thick lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 6), dpi=100)
    ax = fig.add_subplot(projection="3d")
    pts = [np.asarray(s["entry_mm"], float) for s in screws] + [np.asarray(s["tip_mm"], float) for s in screws]
    if labels is not None:
        from .assessment import vertebra_names

        names = vertebra_names(labels)
        arr = np.asarray(labels.array)
        mask = np.isin(arr, list(names)) if names else arr > 0
        kji = np.argwhere(mask)
        if len(kji):
            kji = kji[np.random.default_rng(0).choice(len(kji), min(20000, len(kji)), replace=False)]
            ras = kji[:, ::-1] @ np.asarray(labels.ijk_to_ras)[:3, :3].T + np.asarray(labels.ijk_to_ras)[:3, 3]
            if pts:
                c = np.mean(pts, axis=0)
                ras = ras[np.linalg.norm(ras - c, axis=1) < 80.0]
            ax.scatter(ras[:, 0], ras[:, 1], ras[:, 2], s=0.3, c="#c8b48c", alpha=0.3)
    for s in screws:
        e, t = np.asarray(s["entry_mm"], float), np.asarray(s["tip_mm"], float)
        g = (s.get("breach") or {}).get("grade") if isinstance(s.get("breach"), dict) else None
        ax.plot(*np.stack([e, t]).T, color=GRADE_COLORS.get(g, GRADE_COLORS[None]), linewidth=4)
    ax.set_xlabel("R (mm)")
    ax.set_ylabel("A (mm)")
    ax.set_zlabel("S (mm)")
    ax.view_init(elev=20, azim=-120)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- helpers
def _screws(result):
    screws = result.get("screws") or []
    for i, s in enumerate(screws):
        if not isinstance(s, dict):
            raise ValueError(f"result screws[{i}] must be an object")
    return screws


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _round(v, nd):
    f = _num(v)
    return None if f is None else round(f, nd)


def _fmt(v, nd):
    f = _num(v)
    return "-" if f is None else f"{f:.{nd}f}"


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _rgb(hex_color):
    h = hex_color.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def _short_label(s):
    lvl, side = s.get("level"), s.get("side")
    g = (s.get("breach") or {}).get("grade") if isinstance(s.get("breach"), dict) else None
    if lvl and side:
        return f"{lvl} {side[0].upper()}" + (f" {g}" if g else "")
    return str(s.get("id", ""))


_FONTS: dict = {}


def _font(size):
    from PIL import ImageFont

    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _png_bytes(rgb) -> bytes:
    from PIL import Image

    buf = _pyio.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> Path:
    from .io import write_bytes_atomic

    return write_bytes_atomic(path, data)
