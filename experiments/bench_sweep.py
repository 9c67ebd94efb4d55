"""An 8-member sweep three ways, end to end and per step (docs/experiments.md, "Sweeps:
which way is faster"): ``jaxninja sweep --strategy vmap`` (one vmapped program),
``jaxninja sweep --strategy sequential`` (one process, one compiled chunk reused), and 8
separate ``jaxninja train`` processes. Prints the figures; asserts nothing about speed.

    python experiments/bench_sweep.py [--steps 5000] [--members 8] [--n-hidden 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str]) -> float:
    """Run ``python -m jaxninja *argv``; its wall-clock seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxninja", *argv], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--n-hidden", type=int, default=200)
    a = p.parse_args()
    seeds = ",".join(str(s) for s in range(1, a.members + 1))
    common = ["--steps", str(a.steps), "--n-hidden", str(a.n_hidden), "--chunk-steps", "1000"]
    model_steps = a.members * a.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for how in ("vmap", "sequential"):
            out = Path(tmp, how)
            seconds = timed(["sweep", "--grid", f"seed={seeds}", "--strategy", how,
                             "--out", str(out), *common])  # fmt: skip
            result = json.loads((out / "sweep.json").read_text())
            rows.append((f"sweep --strategy {how}", seconds, result["model_steps_per_second"]))
        total = 0.0
        run_seconds = 0.0
        for s in range(1, a.members + 1):
            out = Path(tmp, f"train{s}")
            total += timed(["train", "--seed", str(s), "--out", str(out), "--samples", "0",
                            *common])  # fmt: skip
            m = json.loads((out / "metrics.json").read_text())
            run_seconds += m["steps_this_run"] / m["steps_per_second"]
        rows.append((f"{a.members} x train (separate processes)", total, model_steps / run_seconds))
    print(f"{a.members} members x {a.steps} steps, H={a.n_hidden}, batch 32")
    print("| way | end to end (s) | model-steps/s end to end | model-steps/s training only |")
    print("|---|---:|---:|---:|")
    for name, seconds, per_step in rows:
        print(f"| {name} | {seconds:.1f} | {model_steps / seconds:.0f} | {per_step:.0f} |")


if __name__ == "__main__":
    main()
