"""Data-parallel checks on forced CPU devices (synchronised batch norm, sharded training),
run by tests/test_parallel.py in a fresh process.

Usage: ``python tests/scripts/data_parallel_cases.py CASE N_DEVICES``. The number of CPU devices
must be fixed before jax is imported, so this script sets ``XLA_FLAGS`` itself and then imports
jax. It prints one JSON object (the largest differences it measured) on its last line;
the test decides what is close enough.

Cases:
  ops    batch_norm / batch_norm_with_stats under shard_map (check_vma on and off) and pmap
         against the single-device op on the global batch, float64; the model's loss and
         gradients through parallel.sharded_loss_and_grads.
  train  50 sharded training steps against 50 single-device steps on the same batches
         (float64; add a third argument ``float32`` for float32 too), and
         job.train_run(devices=N).
"""

from __future__ import annotations

import json
import os
import sys

CASE, N_DEV = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEV}"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxninja import ops  # noqa: E402
from jaxninja.lecture import data, model  # noqa: E402
from jaxninja.training import parallel, train  # noqa: E402

assert jax.device_count() == N_DEV, jax.devices()
AX = parallel.AXIS
MESH = Mesh(np.array(jax.devices()), (AX,))


def maxdiff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def bn_inputs(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)  # numpy: no compile per eager op
    x = rng.normal(size=(rows, 6)) * 3.0 + 1.5
    gain = rng.normal(size=(1, 6)) * 0.1 + 1.0
    bias = rng.normal(size=(1, 6)) * 0.1
    dy = rng.normal(size=(rows, 6))
    return tuple(jnp.asarray(a, jnp.float64) for a in (x, gain, bias, dy))


KINDS = {"unbiased": True, "biased": False}


def _bn_vjp(x, g, b, dy, axis_name=None):
    """``{kind: (y, dx, dgain, dbias)}`` for Bessel-corrected and biased batch norm."""
    out = {}
    for kind, unbiased in KINDS.items():
        y, vjp = jax.vjp(
            lambda x, g, b, u=unbiased: ops.batch_norm(x, g, b, unbiased=u, axis_name=axis_name),
            x, g, b,
        )  # fmt: skip
        out[kind] = (y, *vjp(dy))
    return out


def bn_case(rows: int, mode: str) -> dict[str, dict[str, float]]:
    """Forward y and the VJP (dx, dgain, dbias) of a cotangent dy, sharded vs global,
    for both variances: ``{"unbiased": diffs, "biased": diffs}``."""
    x, gain, bias, dy = bn_inputs(rows)
    ref = jax.jit(_bn_vjp)(x, gain, bias, dy)

    def local(x, g, b, dy):
        out = _bn_vjp(x, g, b, dy, AX)
        if mode != "vma":  # no type tracking: the rule's dgain/dbias are local parts
            out = {
                k: (y, dx, lax.psum(dg, AX), lax.psum(db, AX)) for k, (y, dx, dg, db) in out.items()
            }
        return out

    if mode == "pmap":
        shape = (N_DEV, rows // N_DEV, 6)
        got = jax.pmap(local, axis_name=AX, in_axes=(0, None, None, 0))(
            x.reshape(shape), gain, bias, dy.reshape(shape)
        )
        got = {
            k: (y.reshape(rows, 6), dx.reshape(rows, 6), dg[0], db[0])
            for k, (y, dx, dg, db) in got.items()
        }
    else:
        specs = (P(AX), P(AX), P(), P())
        sharded = jax.shard_map(
            local,
            mesh=MESH,
            in_specs=(P(AX), P(), P(), P(AX)),
            out_specs={k: specs for k in KINDS},
            check_vma=(mode == "vma"),
        )
        got = jax.jit(sharded)(x, gain, bias, dy)  # jit: eager shard_map runs op by op
    names = ("y", "dx", "dgain", "dbias")
    return {
        kind: {n: maxdiff(a, b) for n, a, b in zip(names, got[kind], ref[kind], strict=True)}
        for kind in KINDS
    }


def bn_with_stats_case() -> dict[str, float]:
    """Cotangents flowing into the returned mean and var too (check_vma=True)."""
    x, gain, bias, dy = bn_inputs(4 * N_DEV, seed=1)

    def f(x, g, b, axis_name=None):
        y, mean, var = ops.batch_norm_with_stats(x, g, b, axis_name=axis_name)
        local = jnp.sum(dy_local(axis_name) * y)
        total = local if axis_name is None else lax.psum(local, axis_name)
        return total + jnp.sum(mean**2) + jnp.sum(jnp.log(var))

    def dy_local(axis_name):
        if axis_name is None:
            return dy
        i = lax.axis_index(axis_name)
        return lax.dynamic_slice_in_dim(dy, i * 4, 4)

    ref = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, gain, bias)
    got = jax.jit(
        jax.shard_map(
            lambda x, g, b: jax.grad(f, argnums=(0, 1, 2))(x, g, b, AX),
            mesh=MESH,
            in_specs=(P(AX), P(), P()),
            out_specs=(P(AX), P(), P()),
        )
    )(x, gain, bias)
    return {
        name: maxdiff(a, b) for name, a, b in zip(("dx", "dgain", "dbias"), got, ref, strict=True)
    }


def np_params(n_hidden: int, dtype=jnp.float64, seed: int = 3) -> model.Params:
    """Random parameters from numpy: jax.random outside jit compiles every draw (and
    inside jit threefry takes seconds to compile on 2 cores)."""
    rng = np.random.default_rng(seed)
    H = n_hidden
    shapes = {"C": (27, 10), "W1": (30, H), "b1": (H,), "W2": (H, 27), "b2": (27,)}
    params = {k: rng.normal(size=v) * (0.3 if k != "C" else 1.0) for k, v in shapes.items()}
    params["bngain"] = 1.0 + 0.1 * rng.normal(size=(1, H))
    params["bnbias"] = 0.1 * rng.normal(size=(1, H))
    return {k: jnp.asarray(v, dtype) for k, v in params.items()}


def model_case(backend: str) -> dict[str, float]:
    """parallel.sharded_loss_and_grads against value_and_grad of the one-device loss."""
    rng = np.random.default_rng(4)
    params = np_params(64)
    X = jnp.asarray(rng.integers(0, 27, (32, 3)), jnp.int32)
    Y = jnp.asarray(rng.integers(0, 27, (32,)), jnp.int32)
    ref_fn = model.loss if backend == "custom_vjp" else model.reference_loss
    loss_ref, g_ref = jax.jit(jax.value_and_grad(ref_fn))(params, X, Y)
    loss, grads = parallel.sharded_loss_and_grads(MESH, backend)(params, X, Y)
    return {
        "loss": maxdiff(loss, loss_ref),
        "grads": max(maxdiff(grads[k], g_ref[k]) for k in params),
    }


def train_compare(dtype, steps: int = 50) -> dict[str, float]:
    """``steps`` steps on one device and on N_DEV devices, same config, same batches."""
    splits = data.load_splits(os.environ.get("JAXNINJA_DATA"))
    Xtr, Ytr = (jnp.asarray(a) for a in splits.data["train"])
    cfg = train.TrainConfig(
        batch_size=32, n_hidden=64, steps=steps, chunk_steps=steps, running_stats=True
    )

    def init() -> train.TrainState:
        params = np_params(cfg.n_hidden, dtype)
        H = cfg.n_hidden
        running = {"mean": jnp.zeros((1, H), dtype), "var": jnp.ones((1, H), dtype)}
        opt_state = train.make_optimizer(cfg).init(params)
        return train.TrainState(params, opt_state, jnp.zeros((), jnp.int32), running)

    one = init()
    one, losses_one = train.make_train_chunk(cfg, steps)(one, Xtr, Ytr)
    many = init()
    many, losses_many = train.make_train_chunk(cfg, steps, MESH)(many, Xtr, Ytr)
    assert int(many.step) == steps
    assert many.params["W1"].sharding.is_fully_replicated
    scale = max(float(np.max(np.abs(np.asarray(v)))) for v in one.params.values())
    return {
        "params": max(maxdiff(many.params[k], one.params[k]) for k in one.params),
        "param_scale": scale,
        "losses": maxdiff(losses_many, losses_one),
        "running": max(maxdiff(many.bn_running[k], one.bn_running[k]) for k in ("mean", "var")),
        "first_loss": float(losses_one[0]),
        "last_loss": float(losses_one[-1]),
    }


def train_run_case() -> dict[str, object]:
    """job.train_run sharded over N_DEV devices (the hook behind ``train --devices``)."""
    import tempfile

    from jaxninja.training import checkpoint, job

    cfg = train.TrainConfig(batch_size=16, n_hidden=32, steps=20, chunk_steps=20)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = job.train_run(cfg, tmp, devices=N_DEV, num_samples=0, log=lambda s: None)
        state = checkpoint.load(tmp).state
    return {
        "devices": metrics.get("devices"),
        "step": int(state.step),
        "train_loss": metrics["train_loss"],
    }


def mesh_errors() -> dict[str, str]:
    """The ConfigError messages of parallel.data_mesh."""
    out = {}
    for name, cfg, n in (
        ("uneven", train.TrainConfig(batch_size=30), 4),
        ("too_many", train.TrainConfig(), N_DEV * 2),
        ("manual", train.TrainConfig(backend="manual"), N_DEV),
    ):
        try:
            parallel.data_mesh(cfg, n)
            out[name] = ""
        except train.ConfigError as e:
            out[name] = str(e)
    return out


def main() -> None:
    out: dict[str, object] = {"devices": jax.device_count()}
    if CASE == "ops":
        for mode in ("vma", "novma", "pmap"):
            for kind, diffs in bn_case(4 * N_DEV, mode).items():
                out[f"bn_{mode}_{kind}"] = diffs
        out["bn_one_row_per_device"] = bn_case(N_DEV, "vma")["unbiased"]
        out["bn_with_stats"] = bn_with_stats_case()
        if N_DEV == 4:
            out["model_custom_vjp"] = model_case("custom_vjp")
            out["model_autodiff"] = model_case("autodiff")
        manual = train.TrainConfig(backend="manual")
        out["mesh"] = {
            "size": parallel.data_mesh(train.TrainConfig(), N_DEV).size,
            "default_size": parallel.data_mesh(train.TrainConfig()).size,
            "manual_default_is_one_device": parallel.data_mesh(manual) is None,
        }
        out["errors"] = mesh_errors()
    elif CASE == "train":
        out["float64"] = train_compare(jnp.float64)
        if len(sys.argv) > 3 and sys.argv[3] == "float32":
            out["float32"] = train_compare(jnp.float32)
        out["train_run"] = train_run_case()
    else:
        raise SystemExit(f"unknown case {CASE!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
