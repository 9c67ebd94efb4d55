"""Why ``jaxninja check`` in float32 is not bit-exact on every row (the lecture's was).

    python experiments/float32_rounding.py            # seed 42, H = 64
    python experiments/float32_rounding.py --n-hidden 200

It prints, for each way of writing tanh's backward step ``dhpreact``, how many of its
entries differ from ``jax.grad``'s. The findings, measured on the 2-core CPU machine:

The lecture (PyTorch eager) reached ``maxdiff 0.0`` on all 26 rows of Exercise 1. Here,
under ``jit`` on XLA:CPU, the first 11 rows (``logprobs`` ... ``b2``) are bit-exact and the
other 15 differ by an ulp or a few (maxdiff 3e-11 to 2e-8). float64 shows the same
pattern at 1e-17. Measured with this script and small variations of
it (numbers for seed 42, H = 64, the batch `jaxninja check` draws):

1. **The first difference is** ``dhpreact``, **the tanh step.** The lecture writes
   ``(1 - h**2) * dh``. JAX's tanh rule is a JVP, ``(g + g*ans) * (1 - ans)``, which
   ``jax.grad`` *transposes* in ``g``: the reverse pass computes ``e = dh * (1 - h)`` and
   then ``e + e*h``. XLA:CPU contracts a multiply feeding an add into one fused
   multiply-add (FMA), so the reference is ``fma(e, h, e)`` while the lecture's formula
   becomes ``fma(-h, h, 1) * dh``. An emulated ``fma(e, h, e)`` in numpy (exact float64
   product, a single rounding) reproduces ``jax.grad``'s ``dhpreact`` bit for bit
   (0 of 2048 entries differ), and so does the jitted ``e + e*h``; the lecture's formula
   differs in 794 of 2048 entries (770 by 1 ulp, 24 by 2 ulp; maxdiff 9.3e-10). Without
   the FMA (numpy float32, or eager JAX) ``e + e*h`` differs in 591 entries: the
   contraction matters as much as the order of operations. (H = 200: 2511, 0 and 1883
   of 6400.)
2. **With JAX's tanh form** (``e = dh*(1-h); dhpreact = e + e*h``) in the manual chain,
   3 more rows are exact at H = 64 (``hpreact``, ``bnbias``, ``bnraw``: 14/26) and 5 more
   at H = 200 (16/26). What remains is XLA fusing across the lecture's named
   intermediates inside the single reference program: its optimised HLO computes
   ``power(multiply(sum, 0.0322580636) + 1e-05, -1.5)`` in one fusion, so its
   ``bnvar + eps`` is not the stored, rounded ``bnvar`` plus eps. The lecture's
   ``-0.5 * (bnvar + eps)**-1.5 * dbnvar_inv`` equals a stand-alone jitted ``jax.vjp`` of
   ``(bnvar + eps)**-0.5`` bit for bit, yet differs from the reference's ``dbnvar`` in 9
   of 64 entries even when fed the reference's own ``dbnvar_inv``. Likewise the batch
   reductions ``dbngain`` and ``dbnvar_inv`` (H = 64 only) differ when fed the reference's
   inputs: the same 32-row sum, computed in another fusion. Later rows inherit all this.
3. **Eager mode** gives 10/26 at H = 64 (9/26 at H = 200): ``h.T @ dlogits``
   materialises the transpose and runs another matmul kernel than the reference's
   ``dot_general`` contracting axis 0 (they differ in 1220 of 1728 entries of ``dW2``);
   under ``jit`` XLA folds the transpose into the dot, so ``W2`` is exact.

None of this is an error in the manual backward pass: float64 agrees to 1e-17, and the
float32 differences are roundings of the same mathematics. Nor is the lecture's all-zero
table a property of the formulas: with the same ``h`` and ``dh``, PyTorch 2.13 (CPU, this
machine) computes tanh's backward as ``fma(-h, h, 1) * dh`` (an emulation matches its
autograd in 2048 of 2048 entries, and so does the jitted lecture formula here), while
its eager ``(1 - h**2) * dh`` rounds twice and differs in 583 of 2048 entries. With that
PyTorch, the lecture's ``hpreact`` row would not be exact either; the 2022 run used
another build.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.lecture import check, model, ninja


def float32_rounding_experiment(
    n_hidden: int = 64,
    seed: int = 42,
    batch_size: int = 32,
    data: str | None = None,
) -> dict[str, int]:
    """How many entries of ``dhpreact`` differ from ``jax.grad``'s, per way of writing it.

    All in float32 under ``jit``, on the batch and parameters of :func:`run_check`, with
    ``h`` and ``dh`` taken from the (bit-exact) forward pass and reference. Keys:

    * ``"size"``: number of entries (``batch_size * n_hidden``);
    * ``"lecture"``: ``(1 - h**2) * dh``;
    * ``"jax_form"``: ``e = dh * (1 - h); e + e*h`` (JAX's transposed tanh JVP), jitted;
    * ``"jax_form_eager"``: the same, eager (no fusion, hence no FMA);
    * ``"numpy_fma"``: ``e + e*h`` with a single rounding (float64 arithmetic, which is
      exact for a float32 product), i.e. an emulated FMA;
    * ``"numpy_no_fma"``: ``e + e*h`` in float32 numpy, two roundings.
    """
    vocab_size, Xn, Yn = check.training_batch(data, seed, batch_size)
    with jax.enable_x64(False):
        X, Y = jnp.asarray(Xn), jnp.asarray(Yn)
        params = model.init_params(jax.random.key(seed), vocab_size, n_hidden=n_hidden)
        h = jax.jit(ninja.forward_atomized)(params, X, Y)["h"]
        ref = jax.jit(ninja.reference_grads)(params, X, Y)
        dh, want = ref["h"], np.asarray(ref["hpreact"])

        def jax_form(h: jax.Array, dh: jax.Array) -> jax.Array:
            e = dh * (1.0 - h)
            return e + e * h

        candidates = {
            "lecture": jax.jit(lambda h, dh: (1.0 - h**2) * dh)(h, dh),
            "jax_form": jax.jit(jax_form)(h, dh),
            "jax_form_eager": jax_form(h, dh),
        }
    h32, dh32 = np.asarray(h), np.asarray(dh)
    e = dh32 * (np.float32(1) - h32)
    candidates["numpy_fma"] = (e.astype(np.float64) * h32 + e).astype(np.float32)
    candidates["numpy_no_fma"] = e + e * h32
    counts = {k: int(np.sum(np.asarray(v) != want)) for k, v in candidates.items()}
    return {"size": int(want.size), **counts}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", help="one word per line (default: bundled names.txt)")
    args = parser.parse_args()
    counts = float32_rounding_experiment(args.n_hidden, args.seed, data=args.data)
    size = counts.pop("size")
    for name, n in counts.items():
        print(f"{name:15s} {n:5d} of {size} entries differ from jax.grad's dhpreact")
