"""The demo: a fresh case simulated from the example CT, the whole pipeline, and its score.

``pedicle-screw-pose demo --out out/demo`` writes, under one folder:

* ``case/``       the simulated case (X-rays, case.json, CT and labels, truth/)
* ``run/``        what ``run`` writes: result.json, label maps, overlays, fits, report.html, scene.mrb
* ``evaluation.json``  the metrics of CASE_FORMAT.md against the truth
* ``overview.png``     the views with the true label maps and the fitted screws drawn over them
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import io

DEMO_MARKER = ".pedicle-screw-pose-demo"


def add_demo_arguments(parser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the simulated case")
    parser.add_argument("--views", default="ap,lat", help="views to simulate, e.g. ap,lat,obl")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-scene", action="store_true", help="do not write the Slicer scene")


def demo_command(args) -> int:
    out = Path(args.out)
    _prepare_out(out)
    t0 = time.perf_counter()
    from . import ct as ctmod
    from . import simulate

    print(f"[1/4] simulating a case from the example CT (seed {args.seed}) ...", flush=True)
    ct, labels = ctmod.example_ct()
    case_dir = out / "case"
    simulate.simulate_case(case_dir, ct, labels, seed=args.seed,
                           view_names=tuple(v.strip() for v in args.views.split(",") if v.strip()),
                           levels=("T10", "T11", "T12", "L1", "L2", "L3"), with_ct=True,
                           realistic=True, device=args.device)

    print("[2/4] running the pipeline ...", flush=True)
    from . import pipeline

    case = io.read_case(case_dir)
    run_dir = out / "run"
    result = pipeline.run_case(case, out_dir=run_dir, device=args.device, scene=not args.no_scene)

    print("[3/4] evaluating against the truth ...", flush=True)
    from . import evaluation

    truth = io.read_truth(case_dir)
    ev = evaluation.evaluate(result, truth)
    dice = evaluation.segmentation_dice(run_dir, case_dir)
    if dice is not None:
        ev["segmentation"] = dice
    io.write_json_atomic(out / "evaluation.json", ev)
    print(evaluation.format_table(ev, result=result, truth=truth))
    for name, d in (dice or {}).get("views", {}).items():
        print(f"{name} label map Dice: head {d['head']:.3f}, shaft {d['shaft']:.3f}")

    print("[4/4] drawing the overview ...", flush=True)
    overview = write_overview(out / "overview.png", case, result)
    total = time.perf_counter() - t0
    print()
    print(f"Everything is in {out.resolve()}")
    for p in (case_dir, run_dir / "result.json", run_dir / "report.html", run_dir / "scene.mrb",
              out / "evaluation.json", overview):
        if Path(p).exists():
            print(f"  {p}")
    print(f"demo finished in {total:.1f} s")
    return 0


def _prepare_out(out: Path) -> None:
    """A demo folder may be replaced by the next demo, but nothing else is ever overwritten."""
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise FileExistsError(f"{out} exists, is not empty and was not written by the demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by pedicle-screw-pose demo\n")


def write_overview(path, case, result) -> Path:
    """Each view with the true label map (if any) tinted and the fitted screws drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(case.views)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 6.4), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, view, image in zip(axes, case.views, case.images):
        lo, hi = np.percentile(image, [1, 99.5])
        ax.imshow(np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")
        truth_labels = case.root / "truth" / f"{io.safe_view_filename(view.name)}_labels.png"
        if truth_labels.exists():
            lab = io.read_image(truth_labels)
            rgba = np.zeros(lab.shape + (4,))
            rgba[lab == 1] = (1.0, 0.2, 0.2, 0.45)
            rgba[lab == 2] = (0.2, 0.6, 1.0, 0.45)
            ax.imshow(rgba)
        for s in result.get("screws", []):
            px = s.get("views", {}).get(view.name)
            if px:
                (u0, v0), (u1, v1) = px["entry_px"], px["tip_px"]
                ax.plot([u0, u1], [v0, v1], "-", color="yellow", lw=1.5)
                ax.plot([u0], [v0], "o", color="yellow", ms=4)
        ax.set_title(f"{view.name}: truth labels (red head, blue shaft), fitted axes (yellow)", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return Path(path)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
