"""Vocabulary-parallel linear_cross_entropy on forced CPU devices, run by tests/test_ops.py.

Usage: ``python tests/scripts/vocab_parallel_cases.py N_DEVICES``. The device count is fixed
when jax starts, so this script sets ``XLA_FLAGS`` before importing jax. Inside
``shard_map`` over a mesh axis ``"v"``, ``w`` and ``bias`` hold consecutive slices of the
vocabulary; the values and gradients (x, w, bias) are compared with the single-device op
on the whole arrays (float64), with ``check_vma`` on and off, both layouts, every option,
and rows split over a second axis; rows split with w replicated (no vocabulary axis).
Then under plain ``jit`` with ``w`` sharded over the vocabulary by ``NamedSharding``: the
compiled gradient's all-gathers, ``dw``'s sharding and the differences from the unfused
reference. It prints one JSON object on its last
line; the test decides what is close enough.
"""

from __future__ import annotations

import json
import os
import sys

N_DEV = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEV}"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxninja import ops  # noqa: E402

assert jax.device_count() == N_DEV, jax.devices()
OPTIONS = dict(ignore_index=-100, softcap=1.5, label_smoothing=0.2, z_loss=0.05, chunk_size=4)


def inputs(n: int = 8, d: int = 5, v_per_device: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, v_per_device * N_DEV)) / np.sqrt(d)
    b = rng.normal(size=v_per_device * N_DEV)
    y = rng.integers(0, v_per_device * N_DEV, n)
    y[1] = -100
    where = rng.random(n) < 0.8
    ct, ct_lse = rng.normal(size=n), rng.normal(size=n)
    return tuple(jnp.asarray(a) for a in (x, w, b, y, where, ct, ct_lse))


def maxdiff(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in leaves)


def loss_fn(op, y, where, ct, ct_lse):
    def loss(x, w, b):
        out = op(x, w, b, y, where)
        return jnp.sum(out.loss * ct) + jnp.sum(out.lse * ct_lse)

    return loss


def vocab_parallel(layout: str, check_vma: bool, mesh: Mesh, rows_axis: str | None):
    """The op inside shard_map: w, bias split over "v"; x, labels over ``rows_axis``."""
    w_spec = P(None, "v") if layout == "dv" else P("v", None)
    rows = P(rows_axis)

    def local(x, w, b, y, where):
        kwargs = dict(bias=b, where=where, w_layout=layout, vocab_axis_name="v", **OPTIONS)
        return ops.linear_cross_entropy(x, w, y, return_lse=True, **kwargs)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(rows_axis, None), w_spec, P("v"), rows, rows),
        out_specs=ops.LossAndLse(rows, rows),
        check_vma=check_vma,
    )


def case(layout: str, check_vma: bool, mesh: Mesh, rows_axis: str | None) -> dict:
    x, w, b, y, where, ct, ct_lse = inputs()
    wl = w if layout == "dv" else w.T

    def single(x, w, b, y, where):
        kwargs = dict(bias=b, where=where, w_layout=layout, **OPTIONS)
        return ops.linear_cross_entropy(x, w, y, return_lse=True, **kwargs)

    grads = [
        jax.jit(jax.value_and_grad(loss_fn(op, y, where, ct, ct_lse), (0, 1, 2)))(x, wl, b)
        for op in (vocab_parallel(layout, check_vma, mesh, rows_axis), single)
    ]
    out = jax.jit(vocab_parallel(layout, check_vma, mesh, rows_axis))(x, wl, b, y, where)
    want = single(x, wl, b, y, where)
    return {"values": maxdiff(out, want), "grads": maxdiff(grads[0], grads[1]),
            "grad_scale": maxdiff(grads[1], jax.tree.map(jnp.zeros_like, grads[1])),
            "finite": bool(np.all(np.isfinite(np.asarray(grads[0][0]))))}  # fmt: skip


def sharded_under_jit(layout: str) -> dict:
    """Plain jit, w sharded over the vocabulary by NamedSharding: no all-gather of w, dw
    sharded like w, values and gradients those of the unfused reference."""
    x, w, b, y, where, ct, ct_lse = inputs(n=16, v_per_device=40)
    mesh = Mesh(np.array(jax.devices()), ("v",))
    spec = P(None, "v") if layout == "dv" else P("v", None)
    wl = jax.device_put(w if layout == "dv" else w.T, NamedSharding(mesh, spec))

    def fused(x, w, b, y, where):
        kwargs = dict(bias=b, where=where, w_layout=layout, **OPTIONS)
        return ops.linear_cross_entropy(x, w, y, return_lse=True, **kwargs)

    def reference(x, w, b, y, where):
        z = x @ (w if layout == "dv" else w.T) + b
        kwargs = {k: v for k, v in OPTIONS.items() if k != "chunk_size"}
        return ops.cross_entropy_reference(z, y, where=where, return_lse=True, **kwargs)

    grads = [
        jax.jit(jax.value_and_grad(loss_fn(op, y, where, ct, ct_lse), (0, 1, 2)))
        for op in (fused, reference)
    ]
    hlo = grads[0].lower(x, wl, b).compile().as_text()
    got, want = grads[0](x, wl, b), grads[1](x, np.asarray(wl), b)
    dw = got[1][1]
    return {"values": maxdiff(got[0], want[0]), "grads": maxdiff(got[1], want[1]),
            "all_gathers": hlo.count("all-gather("),
            "dw_sharded_like_w": dw.sharding.is_equivalent_to(wl.sharding, 2),
            "dw_spec": str(dw.sharding.spec)}  # fmt: skip


def rows_only(check_vma: bool) -> dict:
    """No vocabulary axis: rows split over all devices, w replicated (data parallelism)."""
    x, w, b, y, where, ct, ct_lse = inputs()
    mesh = Mesh(np.array(jax.devices()), ("d",))

    def local(x, w, b, y, where):
        kwargs = dict(bias=b, where=where, **OPTIONS)
        return ops.linear_cross_entropy(x, w, y, return_lse=True, **kwargs)

    rows = P("d")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(rows, P(), P(), rows, rows),
                            out_specs=ops.LossAndLse(rows, rows), check_vma=check_vma)  # fmt: skip

    def reference(x, w, b, y, where):
        kwargs = {k: v for k, v in OPTIONS.items() if k != "chunk_size"}
        return ops.cross_entropy_reference(x @ w + b, y, where=where, return_lse=True, **kwargs)

    got, want = (
        jax.jit(jax.value_and_grad(loss_fn(op, y, where, ct, ct_lse), (0, 1, 2)))(x, w, b)
        for op in (sharded, reference)
    )
    return {"values": maxdiff(got[0], want[0]), "grads": maxdiff(got[1], want[1]),
            "grad_scale": maxdiff(want[1], jax.tree.map(jnp.zeros_like, want[1])),
            "finite": bool(np.all(np.isfinite(np.asarray(got[1][0]))))}  # fmt: skip


def main() -> None:
    vocab = Mesh(np.array(jax.devices()), ("v",))
    grid = Mesh(np.array(jax.devices()).reshape(2, N_DEV // 2), ("d", "v"))
    results = {
        f"{layout}/check_vma={vma}": case(layout, vma, vocab, None)
        for layout in ("dv", "vd")
        for vma in (True, False)
    }
    results["dv/rows over d"] = case("dv", True, grid, "d")
    results.update({f"rows only/check_vma={vma}": rows_only(vma) for vma in (True, False)})
    results.update({f"jit/{layout}": sharded_under_jit(layout) for layout in ("dv", "vd")})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
