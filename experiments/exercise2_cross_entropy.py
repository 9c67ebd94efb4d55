"""Exercise 2: the cross-entropy loss and its gradient, each in one expression.

Exercise 1 went through logit_maxes, norm_logits, counts, counts_sum, counts_sum_inv,
probs and logprobs one at a time. Done analytically, the mean cross-entropy over ``n`` rows
has the gradient

    dlogits = (softmax(logits) - onehot(Y)) / n

The lecture first checks the fast loss (``F.cross_entropy``; here
``jaxninja.ops.cross_entropy``) against the long one, then ``dlogits`` against autodiff,
then looks at ``dlogits`` as a picture: each row sums to zero, a dark cell at the correct
character (pulled up) and light cells elsewhere (pushed down, in proportion to the
probability the network gave them).

Run (names.txt from $JAXNINJA_DATA, else the copy bundled in the package)::

    python experiments/exercise2_cross_entropy.py [--out dlogits.png]

Everything is float32 and ``jax.jit``-compiled, as in ``jaxninja check``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import ops
from jaxninja.lecture import data, model, ninja

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="dlogits.png", help="where to save the dlogits picture")
args = parser.parse_args()

SEED = 42
BATCH_SIZE = 32
N_HIDDEN = 64

splits = data.load_splits()
vocab = splits.vocab
Xtr, Ytr = splits.data["train"]
ix = np.random.default_rng(SEED).integers(0, len(Ytr), size=BATCH_SIZE)
Xb, Yb = jnp.asarray(Xtr[ix]), jnp.asarray(Ytr[ix])
params = model.init_params(jax.random.key(SEED), vocab.size, n_hidden=N_HIDDEN)

# the long forward pass of Exercise 1, and autodiff's gradients of it
acts = jax.jit(ninja.forward_atomized)(params, Xb, Yb)
ref = jax.jit(ninja.reference_grads)(params, Xb, Yb)
logits, loss = acts["logits"], acts["loss"]

# forward pass: the loss in one call
loss_fast = jax.jit(lambda z, y: ops.cross_entropy(z, y).mean())(logits, Yb)
print(float(loss_fast), "diff:", float(loss_fast - loss))

# backward pass: dlogits in one expression
dlogits = jax.jit(ninja.cross_entropy_backward)(logits, Yb)
print(ninja.compare("logits", dlogits, ref["logits"]))

# the same expression is what jax.grad runs through ops.cross_entropy's custom VJP
dlogits_vjp = jax.jit(jax.grad(lambda z: ops.cross_entropy(z, Yb).mean()))(logits)
print(ninja.compare("logits (vjp)", dlogits_vjp, ref["logits"]))
print("row sums of dlogits: max |sum| =", float(jnp.abs(dlogits.sum(1)).max()))

try:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: skipping the picture (pip install matplotlib)")
else:
    fig = plt.figure(figsize=(4, 4))
    plt.imshow(np.asarray(dlogits), cmap="gray")
    fig.savefig(args.out)
    plt.close(fig)
    print(f"saved the {dlogits.shape[0]}x{dlogits.shape[1]} dlogits picture to {args.out}")
