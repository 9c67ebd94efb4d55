"""Exercise 4 of "makemore Part 4: Becoming a Backprop Ninja": train with your own backward.

The lecture's last exercise puts it all together: train the MLP with the backward pass
written by hand, no ``loss.backward()``. Here that hand-written backward pass is
:func:`jaxninja.lecture.ninja.manual_grads` (fused cross-entropy and batch-norm rules, a
scatter-add for the embedding table), and nothing below calls autodiff except the one
check at the start, which is what the lecture compares against.

    python experiments/exercise4_train_manual.py               # the lecture's 200,000 steps
    python experiments/exercise4_train_manual.py --steps 5000  # a quick look

The data is ``--data PATH``, else ``$JAXNINJA_DATA``, else the bundled names.txt.
Expect about train 2.07 / val 2.11 after the full run, as in the lecture.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxninja.lecture import data, model, ninja, sample
from jaxninja.training import train

# ----------------------------------------------------------------------- settings
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=200_000, help="training steps (lecture: 200k)")
parser.add_argument("--n-hidden", type=int, default=200, help="hidden units (lecture: 200)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--data", help="one word per line (default: names.txt)")
parser.add_argument("--print-every", type=int, default=10_000, help="progress line interval")
parser.add_argument("--samples", type=int, default=20, help="names to sample at the end")
args = parser.parse_args()
if args.print_every < 1:
    parser.error(f"--print-every must be a positive integer, got {args.print_every}")

# The lecture's hyperparameters; backend="manual" means every step calls manual_grads.
try:
    cfg = train.TrainConfig(
        n_hidden=args.n_hidden, steps=args.steps, seed=args.seed, backend="manual"
    ).validate()
except train.ConfigError as e:
    parser.error(str(e))
print(f"config: {cfg}")

# --------------------------------------------------------------------------- data
# 80% / 10% / 10% of the words, shuffled with random.seed(42) as in the lecture.
splits = data.load_splits(args.data, block_size=cfg.block_size)
vocab = splits.vocab
Xtr, Ytr = (jnp.asarray(a) for a in splits.data["train"])
Xval, Yval = (jnp.asarray(a) for a in splits.data["val"])
print(f"vocabulary: {vocab.size} symbols; train examples: {Xtr.shape[0]:,}")

# ---------------------------------------------------------------------- the model
state = train.init_state(cfg, vocab.size)
params = state.params
print(f"parameters: {sum(p.size for p in params.values()):,}")  # 12,297 with H=200

# ------------------------------------------------- check the backward pass first
# Before trusting manual_grads with 200,000 updates, compare it on one batch with
# autodiff: jax.grad of the plain-jnp loss (what the lecture gets from PyTorch's
# loss.backward()). Each row is the lecture's cmp(): bitwise equal? allclose? max |diff|?
idx = train.batch_indices(cfg, jnp.arange(1), Xtr.shape[0])[0]  # step 0's minibatch
Xb, Yb = Xtr[idx], Ytr[idx]
loss, grads = jax.jit(ninja.manual_grads)(params, Xb, Yb)
ref_loss, ref_grads = jax.jit(jax.value_and_grad(model.reference_loss))(params, Xb, Yb)
print(f"\nmanual_grads vs jax.grad on one batch (loss {float(loss):.4f} vs {float(ref_loss):.4f})")
rows = [ninja.compare(name, grads[name], ref_grads[name]) for name in model.PARAM_NAMES]
for row in rows:
    print(row)
# jax.grad(model.loss) runs this package's custom-VJP rules instead; it agrees as well.
vjp_grads = jax.jit(jax.grad(model.loss))(params, Xb, Yb)
vjp_diff = max(float(jnp.max(jnp.abs(grads[k] - vjp_grads[k]))) for k in model.PARAM_NAMES)
print(f"(vs jax.grad(model.loss), the custom-VJP ops: max |diff| {vjp_diff:.3g})")
if not all(row.approximate for row in rows):
    raise SystemExit("manual_grads disagrees with autodiff: fix the backward pass first")

# ----------------------------------------------------------------------- training
# One step, as in the lecture, is
#     loss, grads = ninja.manual_grads(params, Xb, Yb)   # forward + hand-written backward
#     params = params - lr * grads                         # lr 0.1, then 0.01 from 100k
# train.make_train_chunk compiles `n` such steps into one lax.scan (XLA runs the whole
# chunk without coming back to Python); step s draws its minibatch from
# fold_in(key(seed), s). We print the loss of every print_every-th step, as the lecture.
print("\ntraining with manual_grads (no autodiff)")
t0 = time.perf_counter()
for chunk in train.run_chunks(  # compiles one function per chunk length, runs it
    lambda n: train.make_train_chunk(cfg, n),
    state,
    Xtr,
    Ytr,
    start=0,
    steps=cfg.steps,
    chunk_steps=args.print_every,
):
    state = chunk.state
    print(f"{chunk.step - len(chunk.losses):7d}/{cfg.steps:7d}: {float(chunk.losses[0]):.4f}")
seconds = time.perf_counter() - t0
print(
    f"{cfg.steps:,} steps in {seconds:.1f} s ({cfg.steps / seconds:,.0f} steps/s, compile included)"
)
params = state.params

# ------------------------------------------------------- calibrate the batch norm
# Training normalises with each batch's own statistics; for evaluation and sampling the
# lecture fixes them once: mean and (unbiased) variance of hprebn over the training set.
bn_stats = train.calibrate_bn(params, Xtr)

# ----------------------------------------------------------------------- evaluate
print(f"train {float(train.evaluate(params, bn_stats, Xtr, Ytr)):.4f}")
print(f"val   {float(train.evaluate(params, bn_stats, Xval, Yval)):.4f}")
print("(lecture, 200,000 steps: train 2.0705, val 2.1099)")

# ------------------------------------------------------------------------- sample
# Start from the context "...", draw from softmax(logits), slide, stop at '.'.
if args.samples > 0:
    print(f"\n{args.samples} samples:")
    key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    for name in sample.sample_names(params, bn_stats, vocab, key, args.samples):
        print(name)
