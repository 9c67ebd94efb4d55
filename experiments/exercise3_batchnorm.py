"""Exercise 3: batch norm forward and backward, each in one expression.

Exercise 1 went through bnmeani, bndiff, bndiff2, bnvar, bnvar_inv and bnraw one at a
time. Done analytically (with Bessel's correction: the variance divides by n - 1), the
gradient of the batch-norm input is

    dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0)
                                        - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))

The lecture first checks a one-line forward pass against the long one (``max diff``), then
``dhprebn`` against autodiff. The fused rule is given autodiff's own ``dhpreact``, so the
row tests that one step alone.

Run (names.txt from $JAXNINJA_DATA, else the copy bundled in the package)::

    python experiments/exercise3_batchnorm.py

Everything is float32 and ``jax.jit``-compiled, as in ``jaxninja check``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import ops
from jaxninja.lecture import data, model, ninja

SEED = 42
BATCH_SIZE = 32
N_HIDDEN = 64

splits = data.load_splits()
vocab = splits.vocab
Xtr, Ytr = splits.data["train"]
ix = np.random.default_rng(SEED).integers(0, len(Ytr), size=BATCH_SIZE)
Xb, Yb = jnp.asarray(Xtr[ix]), jnp.asarray(Ytr[ix])
params = model.init_params(jax.random.key(SEED), vocab.size, n_hidden=N_HIDDEN)
bngain, bnbias = params["bngain"], params["bnbias"]

# the long forward pass of Exercise 1, and autodiff's gradients of it
acts = jax.jit(ninja.forward_atomized)(params, Xb, Yb)
ref = jax.jit(ninja.reference_grads)(params, Xb, Yb)
hprebn, hpreact = acts["hprebn"], acts["hpreact"]


# forward pass: batch norm in one line (jnp.var with ddof=1 is the unbiased variance)
@jax.jit
def batch_norm_fast(hprebn):
    mean = hprebn.mean(0, keepdims=True)
    var = hprebn.var(0, keepdims=True, ddof=1)
    return bngain * (hprebn - mean) / jnp.sqrt(var + 1e-5) + bnbias


hpreact_fast = batch_norm_fast(hprebn)
print("max diff:", float(jnp.abs(hpreact_fast - hpreact).max()))
# the library op computes the same thing
hpreact_op = jax.jit(ops.batch_norm)(hprebn, bngain, bnbias)
print("max diff (ops.batch_norm):", float(jnp.abs(hpreact_op - hpreact).max()))

# backward pass: dhprebn in one expression
dhprebn = jax.jit(ninja.batch_norm_backward)(
    ref["hpreact"], bngain, acts["bnvar_inv"], acts["bnraw"]
)
print(ninja.compare("hprebn", dhprebn, ref["hprebn"]))


# the same rule is what jax.grad runs through ops.batch_norm's custom VJP
@jax.jit
def dhprebn_via_vjp(hprebn, dhpreact):
    _, vjp = jax.vjp(lambda x: ops.batch_norm(x, bngain, bnbias), hprebn)
    return vjp(dhpreact)[0]


print(ninja.compare("hprebn (vjp)", dhprebn_via_vjp(hprebn, ref["hpreact"]), ref["hprebn"]))
