# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] tags=["solved-only"]
# # makemore Part 4: Becoming a Backprop Ninja, in JAX (solved)
#
# Andrej Karpathy's lecture, cell by cell: the data, the model, the forward pass in small
# steps, then the four exercises, each backward pass written by hand and compared with
# autodiff (`jax.grad`) by the lecture's `cmp`: exact, approximately right, and the largest
# difference. `lecture_exercises.ipynb` is this notebook with every gradient left for you.
#
# This notebook is generated from `experiments/lecture.py` (`python
# experiments/build_notebooks.py`); edit that file, not this one.

# %% [markdown] tags=["exercise-only"]
# # makemore Part 4: Becoming a Backprop Ninja, in JAX (exercises)
#
# Andrej Karpathy's lecture, cell by cell. Every gradient is yours to write: replace each
# `...  # TODO` with an expression, run the cell and the check after it. A check prints the
# lecture's row when your answer is exact or approximately right; when it is wrong or not
# done yet, it prints the shape the gradient must have and a hint from the lecture's rules.
# The notebook runs top to bottom with the blanks still in it.
#
# `lecture_solved.ipynb` has the answers. Working in a file instead? Define the functions of
# `jaxninja.lecture.ninja` (`backward_atomized`, `cross_entropy_backward`,
# `batch_norm_backward`, `manual_grads`) and run `jaxninja check --solution FILE`.
#
# This notebook is generated from `experiments/lecture.py` (`python
# experiments/build_notebooks.py`); edit that file, not this one.

# %%
# Run this first: where jaxninja is not installed (a hosted notebook), it installs it.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("jaxninja") is None:
    url = "jaxninja[plot] @ git+https://github.com/jaxninja/jaxninja"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", url], check=True)

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxninja import ops
from jaxninja.lecture import data, model, ninja
from jaxninja.lecture.ninja import cmp

# The lecture's full training (200,000 steps) with JAXNINJA_FULL_TRAINING=1; a short one
# (5,000 steps) by default, so that the notebook runs in seconds.
FULL_TRAINING = os.environ.get("JAXNINJA_FULL_TRAINING") == "1"

# %% [markdown]
# ## The data
#
# `names.txt`, one name per line (shipped with jaxninja; `JAXNINJA_DATA=PATH` for another
# file). '.' is token 0; contexts of 3 characters; the lecture's 80/10/10 split of the words.

# %%
splits = data.load_splits()
vocab = splits.vocab
vocab_size = vocab.size
Xtr, Ytr = (jnp.asarray(a) for a in splits.data["train"])
Xdev, Ydev = (jnp.asarray(a) for a in splits.data["val"])
Xte, Yte = (jnp.asarray(a) for a in splits.data["test"])
print(vocab.itos, vocab_size)
print({name: X.shape for name, (X, Y) in splits.data.items()})

# %% [markdown]
# ## The model
#
# The lecture's parameters (`W1` Kaiming for tanh, the rest small random numbers, never
# zeros: zeros can hide a wrong backward pass). 64 hidden units for Exercises 1-3.

# %%
n_embd = 10  # the dimensionality of the character embedding vectors
n_hidden = 64  # the number of neurons in the hidden layer of the MLP
block_size = 3  # context length
params = model.init_params(jax.random.key(42), vocab_size, n_embd, n_hidden, block_size)
C, W1, b1, W2, b2, bngain, bnbias = (params[k] for k in model.PARAM_NAMES)
print({k: v.shape for k, v in params.items()})
print("parameters:", sum(v.size for v in params.values()))

# %%
# one minibatch
batch_size = 32
n = batch_size  # a shorter variable, for convenience
ix = jax.random.randint(jax.random.key(2147483647), (batch_size,), 0, Xtr.shape[0])
Xb, Yb = Xtr[ix], Ytr[ix]

# %% [markdown]
# ## The forward pass, chunked into small steps that are possible to backward one at a time

# %%
emb = C[Xb]  # embed the characters into vectors
embcat = emb.reshape(emb.shape[0], -1)  # concatenate the vectors
# Linear layer 1
hprebn = embcat @ W1 + b1  # hidden layer pre-activation
# BatchNorm layer
bnmeani = 1 / n * hprebn.sum(0, keepdims=True)
bndiff = hprebn - bnmeani
bndiff2 = bndiff**2
bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdims=True)  # Bessel's correction (n-1, not n)
bnvar_inv = (bnvar + 1e-5) ** -0.5
bnraw = bndiff * bnvar_inv
hpreact = bngain * bnraw + bnbias
# Non-linearity
h = jnp.tanh(hpreact)  # hidden layer
# Linear layer 2
logits = h @ W2 + b2  # output layer
# cross entropy loss (same as ops.cross_entropy(logits, Yb).mean())
logit_maxes = logits.max(1, keepdims=True)
norm_logits = logits - logit_maxes  # subtract max for numerical stability
counts = jnp.exp(norm_logits)
counts_sum = counts.sum(1, keepdims=True)
counts_sum_inv = counts_sum**-1  # (1.0 / counts_sum) would not give the exact same rows
probs = counts * counts_sum_inv
logprobs = jnp.log(probs)
loss = -logprobs[jnp.arange(n), Yb].mean()

# Autodiff's gradient of every one of these variables: what the lecture's `t.grad` holds
# (jax.grad through a zero added to each intermediate, see ninja.reference_grads).
g = jax.jit(ninja.reference_grads)(params, Xb, Yb)
print("loss", float(loss))

# %% [markdown]
# ## Exercise 1: backprop through the whole thing manually
#
# Backpropagate through exactly all of the variables as they are defined in the forward
# pass above, one by one, from `loss` back to `C`. `dx` is the gradient of the loss with
# respect to `x`, and has the shape of `x`.
#
# The cross-entropy first: `logprobs`, `probs`, `counts_sum_inv`, `counts_sum`, `counts`,
# `norm_logits`, `logit_maxes`, `logits`.

# %% tags=["answer"]
# loss = -logprobs[range(n), Yb].mean()
dlogprobs = jnp.zeros_like(logprobs).at[jnp.arange(n), Yb].set(-1.0 / n)
# logprobs = log(probs)
dprobs = (1.0 / probs) * dlogprobs
# probs = counts * counts_sum_inv
dcounts_sum_inv = (counts * dprobs).sum(1, keepdims=True)
dcounts = counts_sum_inv * dprobs
# counts_sum_inv = counts_sum**-1
dcounts_sum = -(counts_sum**-2) * dcounts_sum_inv
# counts_sum = counts.sum(1, keepdims=True)
dcounts = dcounts + jnp.ones_like(counts) * dcounts_sum
# counts = exp(norm_logits)
dnorm_logits = counts * dcounts
# norm_logits = logits - logit_maxes
dlogits = dnorm_logits
dlogit_maxes = (-dnorm_logits).sum(1, keepdims=True)
# logit_maxes = logits.max(1, keepdims=True)
dlogits = dlogits + jax.nn.one_hot(logits.argmax(1), vocab_size) * dlogit_maxes

# %%
cmp("logprobs", dlogprobs, g["logprobs"])
cmp("probs", dprobs, g["probs"])
cmp("counts_sum_inv", dcounts_sum_inv, g["counts_sum_inv"])
cmp("counts_sum", dcounts_sum, g["counts_sum"])
cmp("counts", dcounts, g["counts"])
cmp("norm_logits", dnorm_logits, g["norm_logits"])
cmp("logit_maxes", dlogit_maxes, g["logit_maxes"])
cmp("logits", dlogits, g["logits"])

# %% [markdown]
# The second linear layer and the tanh: `h`, `W2`, `b2`, `hpreact`.

# %% tags=["answer"]
# logits = h @ W2 + b2
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
# h = tanh(hpreact)
dhpreact = (1.0 - h**2) * dh

# %%
cmp("h", dh, g["h"])
cmp("W2", dW2, g["W2"])
cmp("b2", db2, g["b2"])
cmp("hpreact", dhpreact, g["hpreact"])

# %% [markdown]
# The batch norm: `bngain`, `bnbias`, `bnraw`, `bnvar_inv`, `bnvar`, `bndiff2`, `bndiff`,
# `bnmeani`, `hprebn`.

# %% tags=["answer"]
# hpreact = bngain * bnraw + bnbias
dbngain = (bnraw * dhpreact).sum(0, keepdims=True)
dbnraw = bngain * dhpreact
dbnbias = dhpreact.sum(0, keepdims=True)
# bnraw = bndiff * bnvar_inv
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdims=True)
# bnvar_inv = (bnvar + 1e-5) ** -0.5
dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv
# bnvar = 1 / (n - 1) * bndiff2.sum(0, keepdims=True)
dbndiff2 = (1.0 / (n - 1)) * jnp.ones_like(bndiff2) * dbnvar
# bndiff2 = bndiff**2
dbndiff = dbndiff + (2 * bndiff) * dbndiff2
# bndiff = hprebn - bnmeani
dhprebn = dbndiff
dbnmeani = (-dbndiff).sum(0, keepdims=True)
# bnmeani = 1 / n * hprebn.sum(0, keepdims=True)
dhprebn = dhprebn + 1.0 / n * jnp.ones_like(hprebn) * dbnmeani

# %%
cmp("bngain", dbngain, g["bngain"])
cmp("bnbias", dbnbias, g["bnbias"])
cmp("bnraw", dbnraw, g["bnraw"])
cmp("bnvar_inv", dbnvar_inv, g["bnvar_inv"])
cmp("bnvar", dbnvar, g["bnvar"])
cmp("bndiff2", dbndiff2, g["bndiff2"])
cmp("bndiff", dbndiff, g["bndiff"])
cmp("bnmeani", dbnmeani, g["bnmeani"])
cmp("hprebn", dhprebn, g["hprebn"])

# %% [markdown]
# The first linear layer and the embedding: `embcat`, `W1`, `b1`, `emb`, `C`.

# %% tags=["answer"]
# hprebn = embcat @ W1 + b1
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
# embcat = emb.reshape(n, -1)
demb = dembcat.reshape(emb.shape)
# emb = C[Xb]
dC = jnp.zeros_like(C).at[Xb].add(demb)

# %%
cmp("embcat", dembcat, g["embcat"])
cmp("W1", dW1, g["W1"])
cmp("b1", db1, g["b1"])
cmp("emb", demb, g["emb"])
cmp("C", dC, g["C"])

# %% [markdown]
# Not every row is bit-exact as in the lecture's PyTorch run: from `dhpreact` on, XLA
# rounds differently (docs, "Why not 26/26 bit-exact"). Approximately right is right.
#
# ## Exercise 2: the cross-entropy loss, forward and backward, in one line each
#
# The forward pass first: the loss in one call, against the long one above.

# %%
loss_fast = ops.cross_entropy(logits, Yb).mean()
print(float(loss_fast), "diff:", float(loss_fast - loss))

# %% [markdown]
# The backward pass: work out `dlogits` analytically (on paper, for one row) and write it in
# one expression.

# %% tags=["answer"]
dlogits = (jax.nn.softmax(logits, axis=1) - jax.nn.one_hot(Yb, vocab_size)) / n

# %%
cmp("logits (fused)", dlogits, g["logits"])

# %% [markdown]
# What `dlogits` looks like: each row sums to zero; the dark cell is the correct character,
# pulled up; the others are pushed down in proportion to the probability they got.

# %%
if dlogits is ...:
    print("dlogits: not done yet (the picture comes with it)")
else:
    print("row sums of dlogits: max |sum| =", float(jnp.abs(dlogits.sum(1)).max()))
    plt.figure(figsize=(4, 4))
    plt.imshow(np.asarray(dlogits), cmap="gray")
    plt.show()

# %% [markdown]
# ## Exercise 3: batch norm, forward and backward, in one line each
#
# The forward pass in one line, against the long one above (`ddof=1`: Bessel's correction).

# %%
hpreact_fast = (
    bngain
    * (hprebn - hprebn.mean(0, keepdims=True))
    / jnp.sqrt(hprebn.var(0, keepdims=True, ddof=1) + 1e-5)
    + bnbias
)
print("max diff:", float(jnp.abs(hpreact_fast - hpreact).max()))

# %% [markdown]
# The backward pass: `dhprebn` from `dhpreact` in one expression, through the mean, the
# variance and the normalization at once. `dhpreact` is autodiff's here, so that this
# exercise stands on its own.

# %%
dhpreact = g["hpreact"]

# %% tags=["answer"]
dhprebn = (bngain * bnvar_inv / n) * (
    n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)
)

# %%
cmp("hprebn (fused)", dhprebn, g["hprebn"])

# %% [markdown]
# ## Exercise 4: putting it all together
#
# Train the MLP with your own backward pass, no autodiff. `manual_grads` is the forward pass
# in a few lines, then the backward pass: Exercise 2's `dlogits`, the layers of Exercise 1,
# Exercise 3's `dhprebn`. The lecture's network: 200 hidden units.


# %% tags=["answer"]
def manual_grads(params, X, Y):
    C, W1, b1, W2, b2, bngain, bnbias = (params[k] for k in model.PARAM_NAMES)
    n = X.shape[0]
    # forward pass
    emb = C[X]
    embcat = emb.reshape(n, -1)
    hprebn = embcat @ W1 + b1
    bnmean = hprebn.mean(0, keepdims=True)
    bnvar = hprebn.var(0, keepdims=True, ddof=1)
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = (hprebn - bnmean) * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = jnp.tanh(hpreact)
    logits = h @ W2 + b2
    loss = ops.cross_entropy(logits, Y).mean()
    # backward pass
    dlogits = (jax.nn.softmax(logits, axis=1) - jax.nn.one_hot(Y, logits.shape[1])) / n
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - h**2) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdims=True)
    dbnbias = dhpreact.sum(0, keepdims=True)
    dhprebn = (bngain * bnvar_inv / n) * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)
    )
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    dC = jnp.zeros_like(C).at[X].add(dembcat.reshape(emb.shape))
    grads = {"C": dC, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2}
    return loss, {**grads, "bngain": dbngain, "bnbias": dbnbias}


# %%
# Before 200,000 updates, one batch against autodiff (of the plain-jnp model).
params = model.init_params(jax.random.key(42), vocab_size, n_embd, 200, block_size)
loss_m, grads_m = manual_grads(params, Xb, Yb)
grads_ref = jax.jit(jax.grad(model.reference_loss))(params, Xb, Yb)
for k in model.PARAM_NAMES:
    cmp(k, grads_m[k], grads_ref[k])
mine = all(ninja.grade(k, grads_m[k], grads_ref[k]).ok for k in model.PARAM_NAMES)
backward = manual_grads if mine else ninja.manual_grads
if not mine:
    print("\nmanual_grads is not done yet: training with jaxninja's ninja.manual_grads")

# %%
max_steps = 200_000 if FULL_TRAINING else 5_000
print_every = 10_000 if FULL_TRAINING else 1_000
key = jax.random.key(42)


def step(params, i):
    # minibatch construct
    ix = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, Xtr.shape[0])
    Xb, Yb = Xtr[ix], Ytr[ix]
    # forward and backward, by hand
    loss, grads = backward(params, Xb, Yb)
    # update
    lr = jnp.where(i < 100_000, 0.1, 0.01)  # step learning rate decay
    return {k: p - lr * grads[k] for k, p in params.items()}, loss


@jax.jit
def steps(params, first):
    # print_every steps in one compiled loop (a Python loop would spend its time in Python)
    return jax.lax.scan(step, params, first + jnp.arange(print_every))


lossi = []
for i in range(0, max_steps, print_every):
    params, losses = steps(params, i)
    lossi.append(losses)
    print(f"{i:7d}/{max_steps:7d}: {float(losses[0]):.4f}")  # print every once in a while
lossi = np.asarray(jnp.concatenate(lossi))

# %% [markdown]
# The loss curve: log10 of the loss, averaged over every 100 steps.

# %%
plt.figure(figsize=(6, 3))
plt.plot(np.log10(lossi).reshape(-1, 100).mean(1))
plt.xlabel("step / 100")
plt.ylabel("log10 loss")
plt.show()

# %% [markdown]
# ## Calibrate the batch norm at the end of training
#
# Training normalizes with each batch's statistics; for evaluation and sampling, fix them
# once: the mean and variance of `hpreact` (before batch norm) over the training set.


# %%
@jax.jit
def calibrate(params):
    C, W1, b1 = params["C"], params["W1"], params["b1"]
    emb = C[Xtr]
    embcat = emb.reshape(emb.shape[0], -1)
    hpreact = embcat @ W1 + b1
    bnmean = hpreact.mean(0, keepdims=True)
    bnvar = hpreact.var(0, keepdims=True, ddof=1)
    return {"mean": bnmean, "var": bnvar}


@jax.jit
def split_loss(params, bn_stats, X, Y):
    logits = model.forward(params, X, bn_stats)
    return ops.cross_entropy(logits, Y).mean()


bn_stats = calibrate(params)
for split, (X, Y) in {"train": (Xtr, Ytr), "val": (Xdev, Ydev)}.items():
    print(split, f"{float(split_loss(params, bn_stats, X, Y)):.4f}")
print("(the lecture, 200,000 steps: train 2.0705, val 2.1099)")

# %% [markdown]
# ## Sample from the model

# %%
forward = jax.jit(model.forward)
key = jax.random.key(2147483647 + 10)
for _ in range(20):
    out, context = [], [0] * block_size  # initialize with all ...
    while True:
        logits = forward(params, jnp.array([context]), bn_stats)
        key, sub = jax.random.split(key)
        ix = int(jax.random.categorical(sub, logits[0]))
        context = context[1:] + [ix]
        if ix == 0:
            break
        out.append(ix)
    print(vocab.decode(out))
