"""Command line: ``pedicle-screw-pose <command> ...``.

Each command lives in the module that owns its work; this file only wires them,
importing a module when its command runs so that ``--help`` stays fast and
``run`` never imports the simulator.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, description)
COMMANDS = {
    "simulate": ("PedicleScrewPoseLib.simulate", "simulate case folders (X-rays, truth) from a CT with virtual screws"),
    "train-segmentation": ("PedicleScrewPoseLib.training", "train the screw segmentation U-Net on simulated X-rays"),
    "segment": ("PedicleScrewPoseLib.segmentation", "segment every view of a case into head / shaft label maps"),
    "run": ("PedicleScrewPoseLib.pipeline", "find every screw of a case and write result.json"),
    "evaluate": ("PedicleScrewPoseLib.evaluation", "score result.json files against truth.json"),
    "demo": ("PedicleScrewPoseLib.demo", "simulate a case from the example CT, run the pipeline, evaluate it"),
}


def _func_name(command: str) -> str:
    return command.replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedicle-screw-pose", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = sys.argv[1] if len(sys.argv) > 1 else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the module of the command being run is imported (and only it adds its options).
        if name == wanted:
            mod = importlib.import_module(module)
            getattr(mod, f"add_{_func_name(name)}_arguments")(p)
    return parser


def main(argv=None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    if not args.command:
        parser.print_help()
        return 2
    mod = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(getattr(mod, f"{_func_name(args.command)}_command")(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        # Bad input: one clear line, non-zero exit, no traceback.
        print(f"pedicle-screw-pose {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
