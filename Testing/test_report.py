"""report.html: self-contained, and checked as a person would see it, in headless Chromium.

The screenshot is kept as a test artefact: in pytest's tmp dir and copied to
Testing/artifacts/report_screenshot.png.
"""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from PedicleScrewPoseLib import geometry, report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _screw(i, entry, tip, level, side, grade, mm, medial=False, grade_range=None, confidence=0.9):
    s = {"id": f"S{i}", "entry_mm": entry, "tip_mm": tip, "diameter_mm": 6.5,
         "length_mm": float(np.linalg.norm(np.subtract(tip, entry))), "confidence": confidence,
         "level": level, "side": side,
         "trajectory": {"transverse_angle_deg": 14.2, "sagittal_angle_deg": -3.1, "entry_offset_mm": 1.4}}
    if grade is not None:
        s["breach"] = {"grade": grade, "max_mm": mm, "direction": "medial" if medial else None,
                       "medial_flag": medial, "grade_uncertain": grade_range is not None,
                       "grade_range": grade_range or [grade, grade]}
    return s


@pytest.fixture(scope="module")
def small_case():
    views = [geometry.ap_view(width=320, height=280), geometry.lateral_view(width=320, height=280)]
    rng = np.random.default_rng(0)
    images = [rng.normal(100.0, 10.0, (280, 320)).astype(np.float32) for _ in views]
    result = {"screws": [
        _screw(1, [22, -40, 10], [6, 0, 12], "T12", "right", "A", 0.0),
        _screw(2, [-22, -40, 10], [-6, 0, 12], "T12", "left", "C", 2.7, medial=True, grade_range=["B", "C"]),
        _screw(3, [22, -40, -22], [6, 0, -20], "L1", "right", "E", 7.1),
        _screw(4, [-22, -40, -22], [-6, 0, -20], None, None, None, None, confidence=0.4),
    ], "unmatched": [{"view": "LAT", "entry_px": [1, 2], "tip_px": [3, 4], "reason": "no partner"}],
        "timing_s": {"segmentation": 1.25, "pose": 2.5, "total": 4.0}}
    return views, images, result


def test_table_rows_columns_and_order(small_case):
    _, _, result = small_case
    keys = [c["key"] for c in report.table_columns()]
    for k in ("id", "level", "side", "size", "transverse_angle_deg", "sagittal_angle_deg", "breach_mm", "grade",
              "medial_flag", "confidence"):
        assert k in keys
    rows = report.table_rows(result)
    assert [r["id"] for r in rows] == ["S2", "S1", "S3", "S4"]  # medial first, then T12 before L1
    assert all(set(r) == set(keys) for r in rows)
    s2 = rows[0]
    assert s2["grade"] == "C" and s2["medial_flag"] is True and s2["grade_range"] == "B-C"
    assert s2["size"] == "6.5 x 43" or s2["size"].startswith("6.5 x ")
    assert rows[-1]["grade"] is None and rows[-1]["medial_flag"] is None


def test_drawing_colours_screws_by_grade(small_case):
    views, images, result = small_case
    rgb = report.draw_screws_on_image(images[0], views[0], result["screws"])
    assert rgb.shape == (280, 320, 3) and rgb.dtype == np.uint8
    colours = {tuple(int(report._rgb(c)[i]) for i in range(3)) for c in ("#1a9850", "#fd8d3c", "#800026")}
    found = {tuple(p) for p in rgb.reshape(-1, 3)}
    assert colours <= found  # A, C and E screws drawn in their grade's colour
    # The drawing sits where the screws project.
    uv = geometry.project(views[0].P, np.array(result["screws"][0]["entry_mm"], float))
    u, v = int(round(uv[0])), int(round(uv[1]))
    patch = rgb[max(v - 8, 0):v + 9, max(u - 8, 0):u + 9].reshape(-1, 3)
    assert any(tuple(p) == tuple(report._rgb("#1a9850")) for p in patch)


def test_report_is_self_contained_and_atomic(small_case, tmp_path):
    views, images, result = small_case
    path = report.write_report(tmp_path, None, result, images=images, views=views, title="case <1>",
                               render_3d=False)
    assert path == tmp_path / "report.html"
    text = path.read_text(encoding="utf-8")
    assert "case &lt;1&gt;" in text and "case <1>" not in text  # names from files are escaped
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", text)  # nothing fetched from anywhere
    assert "<script" not in text
    assert text.count("data:image/png;base64,") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left behind
    with pytest.raises(ValueError, match="one view per image"):
        report.write_report(tmp_path, None, result, images=images, views=views[:1])


def _chromium(args, timeout=90):
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(small_case, tmp_path):
    assert Path(CHROMIUM).exists(), "chromium is needed (Debian package 'chromium'; `make test` installs it)"
    views, images, result = small_case
    path = report.write_report(tmp_path / "out", None, result, images=images, views=views, title="chromium check")
    text = path.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 3  # two X-rays and the 3D picture

    # A copy with a tiny script that counts the images the browser actually decoded (the report
    # itself has no scripts).
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const im=[...document.images];"
        "document.title='loaded '+im.filter(i=>i.complete&&i.naturalWidth>0).length+' of '+im.length;"
        "document.body.setAttribute('data-widths',im.map(i=>i.naturalWidth).join(','));});</script></body>"),
        encoding="utf-8")
    dom = _chromium([f"--user-data-dir={tmp_path / 'profile1'}", "--virtual-time-budget=10000", "--dump-dom",
                     probe.as_uri()])
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>loaded 3 of 3</title>" in html, re.findall(r"<title>.*?</title>", html)
    widths = [int(w) for w in re.search(r'data-widths="([0-9,]+)"', html).group(1).split(",")]
    assert widths[:2] == [320, 320] and widths[2] > 100
    # The table as rendered: one row per screw, in order, with grades and the medial flag.
    table = html[html.index('<table class="screws">'):]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, flags=re.S)
    assert len(rows) == 4
    assert [re.search(r"<td[^>]*>(S\d)</td>", r).group(1) for r in rows] == ["S2", "S1", "S3", "S4"]
    assert "MEDIAL" in rows[0] and ">C<" in rows[0] and ">E<" in rows[2]
    assert "Medial breach (towards the spinal canal)" in html

    shot = tmp_path / "report_screenshot.png"
    run = _chromium([f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}", "--window-size=1200,2000",
                     path.as_uri()])
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape == (2000, 1200, 3)
    assert len(np.unique(im.reshape(-1, 3)[::7], axis=0)) > 50  # not a blank page
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report_screenshot.png")
