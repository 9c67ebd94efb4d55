"""Data-parallel training throughput against the number of devices.

Each device count runs in its own process, so that on CPU the forced device count
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, fixed when jax starts) is exactly
the mesh size; the timing itself is :func:`bench_data_parallel` below, on the training
split of names.txt (``--data``: another word list).

    python experiments/bench_parallel.py                        # 1 2 4 8, batch 4096, H 1024
    python experiments/bench_parallel.py --devices 1 2 --batch-size 1024 --n-hidden 256
    python experiments/bench_parallel.py --in-process           # GPUs/TPUs: use the real ones

On CPU the forced devices share the machine's cores, so this measures the cost of
sharding (collectives, smaller matmuls), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import bench
from jaxninja.lecture import data
from jaxninja.training import parallel, train


def bench_data_parallel(
    device_counts: Sequence[int],
    *,
    batch_size: int,
    n_hidden: int,
    steps: int,
    repeats: int,
    data_path: str | None = None,
) -> list[dict[str, Any]]:
    """Training steps per second for each device count, in this process: one compiled
    chunk of ``steps`` steps per count, the best of ``repeats`` timed runs."""
    splits = data.load_splits(data_path)
    Xtr, Ytr = (jnp.asarray(a) for a in splits.data["train"])
    cfg = train.TrainConfig(
        batch_size=batch_size, n_hidden=n_hidden, steps=steps, chunk_steps=steps
    ).validate()
    results = []
    for n in device_counts:
        state = train.init_state(cfg, splits.vocab.size)
        chunk = train.make_train_chunk(cfg, steps, mesh=parallel.data_mesh(cfg, n))
        compiled, compile_s = bench.compile_timed(chunk, state, Xtr, Ytr)
        best, losses = float("inf"), None
        for _ in range(repeats):
            state = jax.block_until_ready(train.init_state(cfg, splits.vocab.size))
            t = time.perf_counter()
            state, losses = jax.block_until_ready(compiled(state, Xtr, Ytr))
            best = min(best, time.perf_counter() - t)
        row = {"devices": n, "steps_per_second": round(steps / best, 2)}
        row |= {"ms_per_step": round(1e3 * best / steps, 3), "compile_seconds": round(compile_s, 2)}
        results.append(row | {"final_loss": round(float(np.asarray(losses)[-1]), 4)})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="steps per timed chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed chunks; the best is kept")
    p.add_argument("--in-process", action="store_true", help="one process, jax's devices")
    p.add_argument("--data", help="word list (default: names.txt)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child or args.in_process:
        sizes = {k: getattr(args, k) for k in ("batch_size", "n_hidden", "steps", "repeats")}
        rows = bench_data_parallel(args.devices, **sizes, data_path=args.data)
        if args.child:
            print(json.dumps(rows))
            return
    else:
        rows = []
        for n in args.devices:
            env = dict(os.environ)
            flags = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
            env.setdefault("JAX_PLATFORMS", "cpu")
            cmd = [sys.executable, __file__, "--child", "--devices", str(n)]
            cmd += ["--batch-size", str(args.batch_size), "--n-hidden", str(args.n_hidden)]
            cmd += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
            cmd += ["--data", args.data] if args.data else []
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"devices {n} failed:\n{done.stderr[-3000:]}")
            rows += json.loads(done.stdout.strip().splitlines()[-1])

    print(
        f"batch {args.batch_size}, H {args.n_hidden}, {args.steps} steps per chunk, best of "
        f"{args.repeats}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores"
    )
    print(f"{'devices':>7} {'steps/s':>9} {'ms/step':>9} {'speed-up':>9} {'compile s':>10}")
    base = rows[0]["steps_per_second"] if rows else 1.0
    for r in rows:
        print(
            f"{r['devices']:7d} {r['steps_per_second']:9.2f} {r['ms_per_step']:9.2f} "
            f"{r['steps_per_second'] / base:9.2f} {r['compile_seconds']:10.1f}"
        )


if __name__ == "__main__":
    main()
