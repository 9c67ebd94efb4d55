"""Becoming a backprop ninja: the lecture's four exercises, by hand, in JAX (one function
each, README "Where each exercise lives"). The names are the lecture's: ``d<name>`` is the
gradient of the loss with respect to ``<name>``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.lecture.model import BN_EPS, PARAM_NAMES, Params

Array = jax.Array

INTERMEDIATES = tuple(
    "emb embcat hprebn bnmeani bndiff bndiff2 bnvar bnvar_inv bnraw hpreact h logits"
    " logit_maxes norm_logits counts counts_sum counts_sum_inv probs logprobs loss".split()
)
# The 26 gradients Exercise 1 compares, in the order the lecture computes them.
GRADIENTS = tuple(
    "logprobs probs counts_sum_inv counts_sum counts norm_logits logit_maxes logits h W2 b2"
    " hpreact bngain bnbias bnraw bnvar_inv bnvar bndiff2 bndiff bnmeani hprebn embcat W1 b1"
    " emb C".split()
)


def forward_atomized(
    params: Params, X: Array, Y: Array, taps: dict[str, Array] | None = None
) -> dict[str, Array]:
    """The forward pass in the lecture's small steps: ``{name: value}`` for all 20.

    ``taps`` (zeros by default) are added to the named intermediates so that ``jax.grad``
    with respect to a tap is the gradient with respect to that intermediate.

    >>> import jax, jax.numpy as jnp
    >>> from jaxninja.lecture.model import init_params
    >>> p = init_params(jax.random.key(0), n_hidden=64)
    >>> acts = forward_atomized(p, jnp.zeros((32, 3), jnp.int32), jnp.ones(32, jnp.int32))
    >>> acts["bnraw"].shape, acts["loss"].shape
    ((32, 64), ())
    """
    taps = taps or {}

    def tap(name: str, value: Array) -> Array:
        return value + taps[name] if name in taps else value

    C, W1, b1, W2, b2, bngain, bnbias = (params[k] for k in PARAM_NAMES)
    n = X.shape[0]
    emb = tap("emb", C[X])
    embcat = tap("embcat", emb.reshape(n, -1))
    hprebn = tap("hprebn", embcat @ W1 + b1)
    # batch norm, with Bessel's correction (divide by n-1) as in the lecture
    bnmeani = tap("bnmeani", 1 / n * hprebn.sum(0, keepdims=True))
    bndiff = tap("bndiff", hprebn - bnmeani)
    bndiff2 = tap("bndiff2", bndiff**2)
    bnvar = tap("bnvar", 1 / (n - 1) * bndiff2.sum(0, keepdims=True))
    bnvar_inv = tap("bnvar_inv", (bnvar + BN_EPS) ** -0.5)
    bnraw = tap("bnraw", bndiff * bnvar_inv)
    hpreact = tap("hpreact", bngain * bnraw + bnbias)
    h = tap("h", jnp.tanh(hpreact))
    logits = tap("logits", h @ W2 + b2)
    # cross-entropy, spelled out; the max is subtracted for numerical stability
    logit_maxes = tap("logit_maxes", logits.max(1, keepdims=True))
    norm_logits = tap("norm_logits", logits - logit_maxes)
    counts = tap("counts", jnp.exp(norm_logits))
    counts_sum = tap("counts_sum", counts.sum(1, keepdims=True))
    counts_sum_inv = tap("counts_sum_inv", counts_sum**-1)
    probs = tap("probs", counts * counts_sum_inv)
    logprobs = tap("logprobs", jnp.log(probs))
    loss = -logprobs[jnp.arange(n), Y].mean()

    local = locals()  # the variables above, by their lecture names
    return {name: local[name] for name in INTERMEDIATES}


def reference_grads(params: Params, X: Array, Y: Array) -> dict[str, Array]:
    """The 26 gradients of Exercise 1 from ``jax.grad``: parameters directly, every
    intermediate through a zero tap of :func:`forward_atomized`."""
    acts = forward_atomized(params, X, Y)
    taps = {name: jnp.zeros_like(acts[name]) for name in GRADIENTS if name not in params}
    # one dict differentiated at once: the parameters, and the taps (named as intermediates)
    grads = jax.grad(lambda p: forward_atomized(p, X, Y, taps=p)["loss"])({**params, **taps})
    return {name: grads[name] for name in GRADIENTS}


def backward_atomized(
    params: Params, acts: dict[str, Array], X: Array, Y: Array
) -> dict[str, Array]:
    """Exercise 1: backpropagate by hand through every intermediate, in the lecture's order:
    ``{name: dname}`` for the 26 :data:`GRADIENTS`, each the shape of its value. ``acts`` is
    :func:`forward_atomized` ``(params, X, Y)``; ``X (n, block_size)``, ``Y (n,)`` int ids."""
    C, W1, W2, bngain = params["C"], params["W1"], params["W2"], params["bngain"]
    emb, embcat, hprebn, bndiff, bndiff2, bnvar, bnvar_inv, bnraw, h, logits = (
        acts[k] for k in "emb embcat hprebn bndiff bndiff2 bnvar bnvar_inv bnraw h logits".split()
    )
    counts, counts_sum, counts_sum_inv, probs = (
        acts[k] for k in ("counts", "counts_sum", "counts_sum_inv", "probs")
    )
    n = X.shape[0]
    ones = jnp.ones_like
    # loss = -mean(logprobs[range(n), Y])
    dlogprobs = jnp.zeros_like(acts["logprobs"]).at[jnp.arange(n), Y].set(-1.0 / n)
    # logprobs = log(probs)
    dprobs = (1.0 / probs) * dlogprobs
    # probs = counts * counts_sum_inv: counts_sum_inv is broadcast over columns, so sum
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdims=True)
    dcounts = counts_sum_inv * dprobs
    # counts_sum_inv = counts_sum ** -1
    dcounts_sum = -(counts_sum**-2) * dcounts_sum_inv
    # counts_sum = counts.sum(1): every count gets the row's gradient (second branch)
    dcounts = dcounts + ones(counts) * dcounts_sum
    # counts = exp(norm_logits)
    dnorm_logits = counts * dcounts
    # norm_logits = logits - logit_maxes
    dlogits = dnorm_logits
    dlogit_maxes = (-dnorm_logits).sum(1, keepdims=True)
    # logit_maxes = logits.max(1): the gradient flows to the argmax of each row
    onehot_max = jax.nn.one_hot(logits.argmax(1), logits.shape[1], dtype=logits.dtype)
    dlogits = dlogits + onehot_max * dlogit_maxes
    # logits = h @ W2 + b2
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    # h = tanh(hpreact): tanh' = 1 - tanh^2
    dhpreact = (1.0 - h**2) * dh
    # hpreact = bngain * bnraw + bnbias
    dbngain = (bnraw * dhpreact).sum(0, keepdims=True)
    dbnraw = bngain * dhpreact
    dbnbias = dhpreact.sum(0, keepdims=True)
    # bnraw = bndiff * bnvar_inv
    dbndiff = bnvar_inv * dbnraw
    dbnvar_inv = (bndiff * dbnraw).sum(0, keepdims=True)
    # bnvar_inv = (bnvar + eps) ** -0.5
    dbnvar = (-0.5 * (bnvar + BN_EPS) ** -1.5) * dbnvar_inv
    # bnvar = 1/(n-1) * bndiff2.sum(0)
    dbndiff2 = (1.0 / (n - 1)) * ones(bndiff2) * dbnvar
    # bndiff2 = bndiff ** 2 (second branch into bndiff)
    dbndiff = dbndiff + (2 * bndiff) * dbndiff2
    # bndiff = hprebn - bnmeani
    dhprebn = dbndiff
    dbnmeani = (-dbndiff).sum(0, keepdims=True)
    # bnmeani = 1/n * hprebn.sum(0) (second branch into hprebn)
    dhprebn = dhprebn + 1.0 / n * ones(hprebn) * dbnmeani
    # hprebn = embcat @ W1 + b1
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    # embcat = emb.view(n, -1)
    demb = dembcat.reshape(emb.shape)
    # emb = C[X]: a row of C used k times gets k gradients added (scatter-add)
    dC = jnp.zeros_like(C).at[X].add(demb)

    local = locals()  # d<name> above, for each of the 26 names
    return {name: local["d" + name] for name in GRADIENTS}


def cross_entropy_backward(logits: Array, Y: Array) -> Array:
    """Exercise 2: ``dlogits`` of the mean cross-entropy in one expression,
    ``(softmax(logits) - onehot(Y)) / n``.

    >>> import jax.numpy as jnp
    >>> cross_entropy_backward(jnp.zeros((2, 2)), jnp.array([0, 1])).tolist()
    [[-0.25, 0.25], [0.25, -0.25]]
    """
    n, vocab_size = logits.shape
    return (jax.nn.softmax(logits, axis=1) - jax.nn.one_hot(Y, vocab_size, dtype=logits.dtype)) / n


def batch_norm_backward(dhpreact: Array, bngain: Array, bnvar_inv: Array, bnraw: Array) -> Array:
    """Exercise 3: ``dhprebn`` through the Bessel-corrected batch norm in one expression.

    ``dhprebn = bngain*bnvar_inv/n * (n*dhpreact - sum(dhpreact) - n/(n-1)*bnraw*sum(dhpreact*bnraw))``
    with the sums over the batch (axis 0).
    """  # noqa: E501
    n = dhpreact.shape[0]
    return (bngain * bnvar_inv / n) * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)
    )


def manual_grads(params: Params, X: Array, Y: Array) -> tuple[Array, Params]:
    """Exercise 4: ``(loss, grads)`` of the whole network with no autodiff at all: a compact
    forward pass, then the fused rules of Exercises 2 and 3 and a scatter-add for ``C``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxninja.lecture.model import init_params, loss
    >>> p = init_params(jax.random.key(0))
    >>> X, Y = jnp.zeros((8, 3), jnp.int32), jnp.arange(8)
    >>> l, g = manual_grads(p, X, Y)
    >>> bool(jnp.allclose(l, loss(p, X, Y))), sorted(g) == sorted(p)
    (True, True)
    """
    C, W1, b1, W2, b2, bngain, bnbias = (params[k] for k in PARAM_NAMES)
    n = X.shape[0]
    # forward
    emb = C[X]
    embcat = emb.reshape(n, -1)
    hprebn = embcat @ W1 + b1
    bnmean = hprebn.mean(0, keepdims=True)
    bndiff = hprebn - bnmean
    bnvar_inv = jax.lax.rsqrt((bndiff**2).sum(0, keepdims=True) / (n - 1) + BN_EPS)
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = jnp.tanh(hpreact)
    logits = h @ W2 + b2
    logprobs = jax.nn.log_softmax(logits, axis=1)
    loss = -jnp.take_along_axis(logprobs, Y[:, None], axis=1).mean()
    # backward
    dlogits = cross_entropy_backward(logits, Y)
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - h**2) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdims=True)
    dbnbias = dhpreact.sum(0, keepdims=True)
    dhprebn = batch_norm_backward(dhpreact, bngain, bnvar_inv, bnraw)
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    dC = jnp.zeros_like(C).at[X].add(dembcat.reshape(emb.shape))

    local = locals()  # d<name> above, for each parameter
    return loss, {name: local["d" + name] for name in params}


class Comparison(NamedTuple):
    """One row of the lecture's ``cmp`` table."""

    name: str
    exact: bool
    approximate: bool
    maxdiff: float

    def __str__(self) -> str:
        return (
            f"{self.name:15s} | exact: {self.exact!s:5} | approximate: "
            f"{self.approximate!s:5} | maxdiff: {self.maxdiff:.3g}"
        )


def compare(name: str, manual: Any, reference: Any) -> Comparison:
    """The lecture's ``cmp(s, dt, t)``: bitwise equality, ``allclose`` and max |diff|.

    >>> import jax.numpy as jnp
    >>> print(compare("dx", jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0 + 1e-6])))
    dx              | exact: False | approximate: True  | maxdiff: 9.54e-07
    """
    manual, reference = np.asarray(manual), np.asarray(reference)
    if manual.shape != reference.shape:
        raise ValueError(f"{name}: shape {manual.shape} differs from reference {reference.shape}")
    return Comparison(
        name,
        exact=bool(np.array_equal(manual, reference)),
        approximate=bool(np.allclose(manual, reference)),
        maxdiff=float(np.max(np.abs(manual - reference), initial=0.0)),
    )
