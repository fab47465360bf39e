"""Run every benchmark in bench/ in turn; each writes its JSON to bench/results/."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_simulator.py", "bench_segmentation.py", "bench_pose.py", "bench_assessment.py"]

if __name__ == "__main__":
    failed = []
    for name in ORDER:
        print(f"== {name}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / name)])
        if rc:
            failed.append(name)
    print("results in", HERE / "results")
    sys.exit(1 if failed else 0)
