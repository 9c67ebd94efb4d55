"""Time of check_vjp's whole matrix (defaults) on our cross_entropy and batch_norm.

Usage: ``python experiments/bench_check_vjp.py``

Small shapes, as a test suite would use: logits (8, 27) with labels (8,), and batch norm
x (8, 16) with gain and bias (1, 16), float32. Each op is checked twice in this process:
the first call pays for compiling everything (what one test pays), the second shows what
is left when JAX's caches of jnp internals are warm. The time is nearly all XLA
compilation, so the wall time depends on the machine's load: the script prints the load
average, and the process's CPU time (user + system, all its threads), which on an idle
machine bounds the wall time from above when compilation runs on one thread at a time.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import ops
from jaxninja.testing import check_vjp


def inputs() -> dict[str, tuple]:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((8, 27)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 27, 8), jnp.int32)
    x = jnp.asarray(rng.standard_normal((8, 16)) * 3 + 1, jnp.float32)
    gain = jnp.asarray(1 + 0.1 * rng.standard_normal((1, 16)), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal((1, 16)), jnp.float32)
    return {
        "cross_entropy (8, 27)": (ops.cross_entropy, ops.cross_entropy_reference, logits, labels),
        "batch_norm (8, 16)": (ops.batch_norm, ops.batch_norm_reference, x, gain, bias),
    }


def main() -> None:
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    for name, (f, reference, *args) in inputs().items():
        wall, cpu = [], []
        for _ in range(2):
            start, start_cpu = time.perf_counter(), time.process_time()
            report = check_vjp(f, reference, *args)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        load = os.getloadavg()[0]
        print(
            f"{name}: check_vjp wall {wall[0]:.1f} s (first call), {wall[1]:.1f} s (again); "
            f"CPU {cpu[0]:.1f} s, {cpu[1]:.1f} s; {len(report.checked)} settings run, "
            f"{len(report.not_applicable)} not applicable; load average {load:.1f}"
        )


if __name__ == "__main__":
    main()
