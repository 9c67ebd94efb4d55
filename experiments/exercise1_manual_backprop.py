"""Exercise 1: backprop through the whole network by hand, one small step at a time.

The lecture splits the forward pass into 20 named intermediates (emb, embcat, hprebn,
bnmeani, ..., probs, logprobs, loss), backpropagates through every one of them by hand
and compares each of the 26 gradients with autodiff using ``cmp``: bitwise equality,
``allclose`` and the max abs difference. Here autodiff is ``jax.grad`` (through zero
"taps" added to each intermediate, see ``jaxninja.lecture.ninja.reference_grads``).

Run (names.txt from $JAXNINJA_DATA, else the copy bundled in the package)::

    python experiments/exercise1_manual_backprop.py

Both tables are computed with ``jax.jit`` (forward, manual backward and ``jax.grad`` each
compiled on its own). float32 is not bit-exact on every row the way the lecture's PyTorch
run was; float64 shows the same 1-ulp pattern at 1e-17. Why: see "Why not 26/26 bit-exact" in
docs/lecture.md (JAX's tanh rule and XLA:CPU's fused multiply-adds round differently from
``(1 - h**2) * dh``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.lecture import data, model, ninja

SEED = 42
BATCH_SIZE = 32
N_HIDDEN = 64  # the lecture's H for Exercises 1-3

# the lecture's data: 80/10/10 split of names.txt, contexts of 3 characters
splits = data.load_splits()
vocab = splits.vocab
Xtr, Ytr = splits.data["train"]
print(f"vocab size {vocab.size}, training examples {len(Ytr)}")

# one minibatch, as in the lecture
ix = np.random.default_rng(SEED).integers(0, len(Ytr), size=BATCH_SIZE)
Xb, Yb = jnp.asarray(Xtr[ix]), jnp.asarray(Ytr[ix])

forward = jax.jit(ninja.forward_atomized)  # the 20 intermediates
backward = jax.jit(ninja.backward_atomized)  # Exercise 1, by hand
autodiff = jax.jit(ninja.reference_grads)  # the same 26 gradients from jax.grad


params = model.init_params(jax.random.key(SEED), vocab.size, n_hidden=N_HIDDEN)


def cmp_table(params) -> int:
    """Print the lecture's cmp rows for the 26 gradients; return how many are exact."""
    acts = forward(params, Xb, Yb)
    grads = backward(params, acts, Xb, Yb)
    ref = autodiff(params, Xb, Yb)
    dtype = params["W1"].dtype.name
    print(f"\n{dtype} (jit), loss {float(acts['loss']):.6f}")
    rows = [ninja.compare(name, grads[name], ref[name]) for name in ninja.GRADIENTS]
    for row in rows:
        print(row)
    n_exact = sum(r.exact for r in rows)
    worst = max(r.maxdiff for r in rows)
    print(f"{n_exact}/{len(rows)} rows exact, all approximate: {all(r.approximate for r in rows)}, "
          f"largest maxdiff {worst:.3g}")  # fmt: skip
    return n_exact


cmp_table(params)

# The same in float64 (the same parameter values, converted): 64-bit types are turned on
# for this block only.
with jax.enable_x64(True):
    cmp_table({k: jnp.asarray(v, jnp.float64) for k, v in params.items()})
