"""How long the command line takes before it does anything, against `import torch`
measured in the same run (machines differ ~2× in absolute speed; the ratios do not).

    python benchmarks/bench_cli.py [--repeat 5]

Prints JSON: the median wall time of each command and its ratio to `import torch`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PY = sys.executable
CASES = {
    "import torch": [PY, "-c", "import torch"],
    "import mmdialog": [PY, "-c", "import mmdialog"],
    "mmdialog --help": [PY, "-m", "mmdialog", "--help"],
    "mmdialog plugins": [PY, "-m", "mmdialog", "plugins"],
    "config error": [PY, "-m", "mmdialog", "train", "--set", "model.bridge.tau"],
}
#: ratio to `import torch` that each case should stay under
TARGETS = {"mmdialog --help": 0.5, "mmdialog plugins": 1.0, "config error": 1.0, "import mmdialog": 1.5}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=ENV, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for cmd in CASES.values():  # warm the file cache once
        wall(cmd)
    times = {name: [] for name in CASES}
    for _ in range(args.repeat):  # interleaved, so a busy moment hits every case alike
        for name, cmd in CASES.items():
            times[name].append(wall(cmd))
    base = statistics.median(times["import torch"])
    out = {"repeat": args.repeat, "import_torch_s": round(base, 3), "cases": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"median_s": round(med, 3), "ratio_to_import_torch": round(med / base, 2)}
        if name in TARGETS:
            row["target_ratio"] = TARGETS[name]
            row["met"] = med / base <= TARGETS[name]
        out["cases"][name] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
