"""Data-parallel training throughput against the number of devices.

Each device count runs in its own process, so that on CPU the forced device count
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, fixed when jax starts) is exactly
the mesh size; the timing itself is :func:`jaxninja.parallel.bench_data_parallel`.

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


def _one(args: argparse.Namespace, counts: list[int]) -> list[dict]:
    from jaxninja.parallel import bench_data_parallel

    return bench_data_parallel(
        counts,
        batch_size=args.batch_size,
        n_hidden=args.n_hidden,
        steps=args.steps,
        repeats=args.repeats,
        log=None,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-hidden", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="steps per timed chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed chunks; the best is kept")
    p.add_argument("--in-process", action="store_true",
                   help="time all counts in this process (on the devices jax finds)")  # fmt: skip
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child or args.in_process:
        rows = _one(args, args.devices)
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
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"devices {n} failed:\n{done.stderr[-3000:]}")
            rows += json.loads(done.stdout.strip().splitlines()[-1])

    import jax

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
