"""Run every benchmark in bench/ in turn; each writes its JSON to bench/results/."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [["bench_simulator.py"], ["bench_segmentation.py"], ["bench_pose.py"],
         ["bench_pose.py", "--screw-design", "low-profile", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--screw-design", "tall-blunt", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--renderer", "voxel", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--renderer", "voxel", "--screw-design", "low-profile", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--renderer", "voxel-raw", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--renderer", "voxel-cannulated", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--renderer", "voxel", "--screw-design", "tall-blunt", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--renderer", "voxel-prone", "--n-cases", "10", "--skip-timing"],
         ["bench_pose.py", "--renderer", "voxel-prone", "--screw-design", "tall-blunt", "--n-cases", "10",
          "--skip-timing"],
         ["bench_assessment.py"]]

if __name__ == "__main__":
    failed = []
    for name, *args in ORDER:
        print(f"== {name} {' '.join(args)}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / name), *args])
        if rc:
            failed.append(" ".join([name, *args]))
    print("results in", HERE / "results")
    sys.exit(1 if failed else 0)
