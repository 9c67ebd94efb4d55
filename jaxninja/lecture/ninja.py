"""Becoming a backprop ninja: the lecture's four exercises, by hand, in JAX (one function
each, docs "The lecture"), and the lecture's ``cmp`` that grades them against ``jax.grad``.
The names are the lecture's: ``d<name>`` is the gradient of the loss with respect to ``<name>``.

The lecture's rules, which ``HINTS`` spell out per gradient: the gradient has the shape
of its variable; a broadcast in the forward pass is a sum in the backward pass (and a sum a
broadcast); a variable used twice gets the sum of both gradients; ``A @ B`` sends
``dC @ B.T`` to ``A`` and ``A.T @ dC`` to ``B``; indexing forward is a scatter-add backward.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """The forward pass in the lecture's small steps, each intermediate named.

    Args:
        params: ``jaxninja.lecture.model.init_params``' dict.
        X: ``(n, block_size)`` int contexts.
        Y: ``(n,)`` int labels.
        taps: optional ``{name: array}`` added to the named intermediates, so that
            ``jax.grad`` with respect to a (zero) tap is the gradient with respect to that
            intermediate (``reference_grads``).

    Returns:
        ``{name: value}`` for the 20 ``INTERMEDIATES``, ``loss`` a scalar.

    Examples:
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
    """The 26 gradients of Exercise 1 from ``jax.grad``: what the lecture's ``t.grad`` holds.

    Parameters are differentiated directly, every intermediate through a zero tap of
    ``forward_atomized``.

    Args:
        params: the parameters.
        X: ``(n, block_size)`` int contexts.
        Y: ``(n,)`` int labels.

    Returns:
        ``{name: gradient}`` for the 26 ``GRADIENTS``, each the shape of its variable.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxninja.lecture.model import init_params
        >>> p = init_params(jax.random.key(0), n_hidden=8)
        >>> g = reference_grads(p, jnp.zeros((4, 3), jnp.int32), jnp.arange(4))
        >>> dlogprobs = g["logprobs"]
        >>> dlogprobs[0, 0].item(), g["C"].shape
        (-0.25, (27, 10))
    """
    acts = forward_atomized(params, X, Y)
    taps = {name: jnp.zeros_like(acts[name]) for name in GRADIENTS if name not in params}
    # one dict differentiated at once: the parameters, and the taps (named as intermediates)
    grads = jax.grad(lambda p: forward_atomized(p, X, Y, taps=p)["loss"])({**params, **taps})
    return {name: grads[name] for name in GRADIENTS}


def backward_atomized(
    params: Params, acts: dict[str, Array], X: Array, Y: Array
) -> dict[str, Array]:
    """Exercise 1: backpropagate by hand through every intermediate, in the lecture's order.

    Args:
        params: the parameters.
        acts: ``forward_atomized`` ``(params, X, Y)``.
        X: ``(n, block_size)`` int contexts.
        Y: ``(n,)`` int labels.

    Returns:
        ``{name: dname}`` for the 26 ``GRADIENTS``, each the shape of its variable.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxninja.lecture.model import init_params
        >>> p = init_params(jax.random.key(0), n_hidden=8)
        >>> X, Y = jnp.arange(12).reshape(4, 3), jnp.arange(4)
        >>> g = backward_atomized(p, forward_atomized(p, X, Y), X, Y)
        >>> len(g), compare("W1", g["W1"], reference_grads(p, X, Y)["W1"]).approximate
        (26, True)
    """
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
    """Exercise 2: ``dlogits`` of the mean cross-entropy in one expression.

    ``dlogits = (softmax(logits) - onehot(Y)) / n``, the softmax over each row.

    Args:
        logits: ``(n, vocab_size)``.
        Y: ``(n,)`` int labels.

    Returns:
        ``dlogits``, ``(n, vocab_size)``; each row sums to zero.

    Examples:
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

    Args:
        dhpreact: ``(n, H)``, the gradient of the batch norm's output.
        bngain: ``(1, H)``.
        bnvar_inv: ``(1, H)``, ``(bnvar + eps)**-0.5`` of the forward pass.
        bnraw: ``(n, H)``, the normalized input of the forward pass.

    Returns:
        ``dhprebn``, ``(n, H)``; each column sums to zero.

    Examples:
        >>> import jax.numpy as jnp
        >>> bnraw = jnp.array([[-1.0], [0.0], [1.0]])  # n = 3: mean 0, variance (n - 1) 1
        >>> dhpreact = jnp.array([[1.0], [1.0], [1.0]])  # a shift of hprebn changes nothing
        >>> batch_norm_backward(dhpreact, jnp.ones((1, 1)), jnp.ones((1, 1)), bnraw).tolist()
        [[0.0], [0.0], [0.0]]
    """  # noqa: E501
    n = dhpreact.shape[0]
    return (bngain * bnvar_inv / n) * (
        n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0)
    )


def manual_grads(params: Params, X: Array, Y: Array) -> tuple[Array, Params]:
    """Exercise 4: the loss and its gradients with no autodiff at all.

    A compact forward pass, then the fused rules of Exercises 2 and 3 and a scatter-add for
    ``C``.

    Args:
        params: the parameters.
        X: ``(n, block_size)`` int contexts.
        Y: ``(n,)`` int labels.

    Returns:
        ``(loss, grads)``: the mean cross-entropy and ``{name: gradient}`` for every
        parameter, each of its shape.

    Examples:
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


# ----------------------------------------------------------------- the lecture's cmp

RIGHT, APPROXIMATE, WRONG, MISSING = "right", "approximately right", "wrong", "missing"
"""The verdicts of :func:`grade`: bit-exact, within the tolerance, neither, no answer."""


class Tolerance(NamedTuple):
    """When a gradient counts as approximately right: every entry within
    ``atol + rtol * |reference|`` (``numpy.allclose``'s test, the lecture's ``approximate``).

    Attributes:
        rtol: relative part, the lecture's (``torch.allclose``'s default, 1e-5).
        atol: absolute part, for entries that are mathematically zero (``db1``: batch norm
            removes the bias) and so are rounding noise only.
    """

    rtol: float
    atol: float

    def __str__(self) -> str:
        return f"|diff| <= {self.atol:.0e} + {self.rtol:.0e} * |jax.grad|"


TOLERANCES: Mapping[str, Tolerance] = {
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
    "float64": Tolerance(rtol=1e-10, atol=1e-12),
}
"""Per dtype. Largest |diff| of a right answer measured on 36 cases (H = 64, 1000, 4000;
names.txt, a 3000-character and a 2-character word list; seeds 0, 1): 3.6e-7 in float32
(always a mathematically-zero entry), 7.9e-16 in float64. A wrong formula is off by ~1e-2
of the gradient. The lecture's ``atol`` of 1e-8 would call a right float32 ``db1`` wrong."""


def tolerance_for(dtype: Any) -> Tolerance:
    """The ``TOLERANCES`` entry of ``dtype``: float64's for float64, else float32's.

    Examples:
        >>> tolerance_for("float64").atol
        1e-12
    """
    return TOLERANCES["float64" if np.dtype(dtype) == np.float64 else "float32"]


class Comparison(NamedTuple):
    """One row of the lecture's ``cmp`` table; ``str()`` prints it the lecture's way.

    Attributes:
        name: the variable whose gradient is compared.
        exact: bit-for-bit equal to the reference.
        approximate: every entry within the ``Tolerance``.
        maxdiff: the largest absolute difference (NaN if either side has a NaN there).
    """

    name: str
    exact: bool
    approximate: bool
    maxdiff: float

    def __str__(self) -> str:
        # the lecture: f'{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}'  # noqa: E501
        return (
            f"{self.name:15s} | exact: {self.exact!s:5s} | "
            f"approximate: {self.approximate!s:5s} | maxdiff: {self.maxdiff}"
        )


def compare(
    name: str, manual: Any, reference: Any, tolerance: Tolerance | None = None
) -> Comparison:
    """The lecture's ``cmp(s, dt, t)`` as data: bitwise equality, the tolerance, max |diff|.

    Args:
        name: the row's name.
        manual: the hand-written gradient.
        reference: ``jax.grad``'s, of the same shape.
        tolerance: default ``tolerance_for`` the reference's dtype.

    Returns:
        A ``Comparison``.

    Raises:
        ValueError: the shapes differ (``grade`` reports that as a wrong answer).

    Examples:
        >>> import jax.numpy as jnp
        >>> print(compare("dx", jnp.array([1.0, 2.0]), jnp.array([1.0, 2.0 + 1e-6])))
        dx              | exact: False | approximate: True  | maxdiff: 9.5367431640625e-07
    """
    manual, reference = np.asarray(manual), np.asarray(reference)
    if manual.shape != reference.shape:
        raise ValueError(f"{name}: shape {manual.shape} differs from reference {reference.shape}")
    tol = tolerance or tolerance_for(reference.dtype)
    diff = np.abs(manual.astype(np.float64) - reference.astype(np.float64))
    within = diff <= tol.atol + tol.rtol * np.abs(reference.astype(np.float64))
    return Comparison(
        name,
        exact=bool(np.array_equal(manual, reference)),
        approximate=bool(np.all(within)),
        maxdiff=float(np.max(diff, initial=0.0)),
    )


# The lecture's rules, per gradient: what a wrong or missing answer is shown.
_BROADCAST = "broadcast over the rows in the forward pass: sum over axis 0, keepdims=True"
HINTS: Mapping[str, str] = {
    "logprobs": "loss = -mean of the n picked logprobs[i, Y[i]]: each gets -1/n, the rest 0",
    "probs": "logprobs = log(probs), and d/dx log(x) = 1/x; then the chain rule",
    "counts_sum_inv": "counts_sum_inv (n, 1) is broadcast over the columns in "
    "probs = counts * counts_sum_inv: multiply by counts, then sum over axis 1, keepdims=True",
    "counts_sum": "counts_sum_inv = counts_sum**-1, and d/dx x**-1 = -x**-2",
    "counts": "counts is used twice (probs and counts_sum): add both gradients; the sum over "
    "axis 1 sends dcounts_sum to every entry of its row",
    "norm_logits": "counts = exp(norm_logits), and d/dx exp(x) = exp(x), which is counts",
    "logit_maxes": "logit_maxes (n, 1) is broadcast in norm_logits = logits - logit_maxes: "
    "minus the sum over axis 1, keepdims=True",
    "logits": "logits is used twice (norm_logits and logit_maxes): the max sends its gradient "
    "to the argmax of each row (one_hot(logits.argmax(1)))",
    "h": "logits = h @ W2 + b2: a matmul's gradient is a matmul of dlogits with the other "
    "factor, transposed so that the shapes match",
    "W2": "logits = h @ W2 + b2: a matmul's gradient is a matmul of the other factor, "
    "transposed, with dlogits, so that the shapes match",
    "b2": "b2 is " + _BROADCAST.replace(", keepdims=True", " (b2 is 1-D)"),
    "hpreact": "h = tanh(hpreact), and d/dx tanh(x) = 1 - tanh(x)**2 = 1 - h**2",
    "bngain": "bngain (1, H) is " + _BROADCAST,
    "bnbias": "bnbias (1, H) is " + _BROADCAST,
    "bnraw": "hpreact = bngain * bnraw + bnbias: bngain * dhpreact",
    "bnvar_inv": "bnvar_inv (1, H) is " + _BROADCAST,
    "bnvar": "bnvar_inv = (bnvar + eps)**-0.5, and d/dx (x + eps)**-0.5 = -0.5 * (x + eps)**-1.5",
    "bndiff2": "bnvar = 1/(n-1) * bndiff2.sum(0): every row gets 1/(n-1) * dbnvar "
    "(Bessel's correction: n - 1, not n)",
    "bndiff": "bndiff is used twice (bnraw and bndiff2): add bnvar_inv * dbnraw and "
    "2 * bndiff * dbndiff2",
    "bnmeani": "bnmeani (1, H) is broadcast in bndiff = hprebn - bnmeani: minus the sum over "
    "axis 0, keepdims=True",
    "hprebn": "hprebn is used twice (bndiff and bnmeani): add dbndiff and 1/n * dbnmeani, "
    "broadcast back over the rows",
    "embcat": "hprebn = embcat @ W1 + b1: as for h, a matmul with W1, shapes matched",
    "W1": "hprebn = embcat @ W1 + b1: as for W2, a matmul with embcat, shapes matched",
    "b1": "b1 is " + _BROADCAST.replace(", keepdims=True", " (b1 is 1-D)"),
    "emb": "embcat is emb viewed as (n, block_size * n_embd): reshape dembcat to emb's shape",
    "C": "emb = C[X] picks rows of C, a row picked k times gets k gradients: a scatter-add "
    "(jnp's .at[...].add)",
    "logits (fused)": "work out d loss / d logits[i, j] on paper for one row: softmax's p_j, "
    "minus 1 at the label, and the mean divides by n",
    "hprebn (fused)": "work out dhprebn on paper through mean, variance (n - 1) and "
    "normalization: sums over the batch of dhpreact and of dhpreact * bnraw appear",
}


class Grade(NamedTuple):
    """An answer graded against ``jax.grad``: what ``cmp`` and ``jaxninja check`` print.

    Attributes:
        name: the variable.
        verdict: ``RIGHT``, ``APPROXIMATE``, ``WRONG`` or ``MISSING``.
        expected_shape: the reference's shape (the variable's).
        shape: the answer's shape, ``None`` when there is no answer.
        comparison: the ``Comparison``, ``None`` unless the shapes agree.
        hint: the lecture's rule for this gradient (``HINTS``), or ``""``.
    """

    name: str
    verdict: str
    expected_shape: tuple[int, ...]
    shape: tuple[int, ...] | None
    comparison: Comparison | None
    hint: str = ""

    @property
    def ok(self) -> bool:
        """Right or approximately right."""
        return self.verdict in (RIGHT, APPROXIMATE)

    def row(self, missing: str = MISSING) -> str:
        """One line: the lecture's row and the verdict; ``missing`` names a missing answer."""
        if self.comparison is not None:
            return f"{self.comparison!s:84s} | {self.verdict}"  # the verdicts aligned
        if self.shape is None:
            return f"{self.name:15s} | {missing}"
        return f"{self.name:15s} | shape {self.shape}, expected {self.expected_shape} | {WRONG}"

    def advice(self) -> str:
        """The expected shape, the answer's, and the hint."""
        yours = "" if self.shape is None else f", yours {self.shape}"
        hint = f"; hint: {self.hint}" if self.hint else ""
        return f"expected shape {self.expected_shape}{yours}{hint}"

    def __str__(self) -> str:
        return self.row()


def grade(
    name: str,
    answer: Any,
    reference: Any,
    tolerance: Tolerance | None = None,
    hint: str | None = None,
) -> Grade:
    """Grade one answer: no answer (``None`` or ``...``), another shape, or ``compare``.

    Args:
        name: the variable, also the key of its hint in ``HINTS``.
        answer: the learner's gradient, ``...`` or ``None`` when not done yet.
        reference: ``jax.grad``'s gradient.
        tolerance: default ``tolerance_for`` the reference's dtype.
        hint: default ``HINTS.get(name, "")``.

    Returns:
        A ``Grade``.

    Examples:
        >>> import numpy as np
        >>> grade("b2", np.ones((4, 3)), np.ones(3)).verdict
        'wrong'
        >>> grade("b2", ..., np.ones(3)).row("not done yet")
        'b2              | not done yet'
    """
    reference = np.asarray(reference)
    hint = HINTS.get(name, "") if hint is None else hint
    if answer is None or answer is Ellipsis:
        return Grade(name, MISSING, reference.shape, None, None, hint)
    answer = np.asarray(answer)
    if answer.shape != reference.shape or not np.issubdtype(answer.dtype, np.number):
        return Grade(name, WRONG, reference.shape, answer.shape, None, hint)
    comparison = compare(name, answer, reference, tolerance)
    verdict = RIGHT if comparison.exact else APPROXIMATE if comparison.approximate else WRONG
    return Grade(name, verdict, reference.shape, answer.shape, comparison, hint)


def cmp(s: str, dt: Any, t: Any) -> None:
    """The lecture's ``cmp(s, dt, t)``, for notebooks: print ``dt`` graded against ``t``.

    ``t`` is ``jax.grad``'s gradient (JAX has no ``t.grad``). A right answer prints the
    lecture's row; a wrong one also its verdict, the expected shape and the lecture's rule;
    ``dt = ...`` (a blank) prints "not done yet".

    Args:
        s: the variable's name (the key of its hint in ``HINTS``).
        dt: your gradient, or ``...``.
        t: the reference gradient.

    Examples:
        >>> import numpy as np
        >>> cmp("b2", np.zeros(3), np.zeros(3))
        b2              | exact: True  | approximate: True  | maxdiff: 0.0
        >>> cmp("b2", ..., np.zeros(3))
        b2              | not done yet
            expected shape (3,); hint: b2 is broadcast over the rows in the forward pass: sum over axis 0 (b2 is 1-D)
    """  # noqa: E501
    g = grade(s, dt, t)
    if g.ok and g.comparison is not None:
        print(g.comparison)
    else:
        print(f"{g.row('not done yet')}\n    {g.advice()}")
