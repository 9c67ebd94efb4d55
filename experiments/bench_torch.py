"""PyTorch baselines for ``jaxninja bench``: the lecture's Exercise 4, timed in eager mode.

Three ways to train the same network (same data, batch size, hidden size, init scales,
SGD with lr 0.1) in PyTorch, each returning microseconds per training step:

* :func:`lecture_loop`: the lecture's Exercise-4 loop with the manual backward pass and
  its Python double loop for ``dC`` (``for k ...: for j ...: dC[ix] += demb[k, j]``);
* :func:`vectorised_dc`: the same loop with ``dC.index_add_(0, Xb.view(-1), demb...)``;
* :func:`autograd`: the usual ``F.cross_entropy`` + ``loss.backward()`` loop.

Every step includes drawing the minibatch (``torch.randint``), as in the lecture. Each
baseline runs with ``threads`` intra-op threads (default 1: these tensors are far below
torch's parallel grain size, and on a 2-core machine shared with JAX's thread pool, or
with other work, OpenMP's spinning threads made 2 threads 10-25x slower than 1). torch is
optional (``pip install jaxninja[bench]``, i.e. ``torch==2.13.0``): ``jaxninja bench``
imports this file only when torch is importable. Run it alone with
``python experiments/bench_torch.py [--steps N] [--n-hidden H] [--batch-size B]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

BASELINES = ("lecture_loop", "vectorised_dc", "autograd")


def _init(vocab_size: int, n_embd: int, n_hidden: int, block_size: int, seed: int):
    """The lecture's Exercise-4 parameters (``torch.Generator().manual_seed(seed)``)."""
    g = torch.Generator().manual_seed(seed)
    fan_in = n_embd * block_size
    C = torch.randn((vocab_size, n_embd), generator=g)
    W1 = torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / fan_in**0.5
    b1 = torch.randn(n_hidden, generator=g) * 0.1
    W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1
    b2 = torch.randn(vocab_size, generator=g) * 0.1
    bngain = torch.randn((1, n_hidden), generator=g) * 0.1 + 1.0
    bnbias = torch.randn((1, n_hidden), generator=g) * 0.1
    return [C, W1, b1, W2, b2, bngain, bnbias]


def _manual_step(params, Xb, Yb, lr: float, loop_dc: bool) -> float:
    """One step of the lecture's Exercise 4: forward, manual backward, SGD."""
    C, W1, b1, W2, b2, bngain, bnbias = params
    n = Xb.shape[0]
    with torch.no_grad():
        emb = C[Xb]
        embcat = emb.view(emb.shape[0], -1)
        hprebn = embcat @ W1 + b1
        bnmean = hprebn.mean(0, keepdim=True)
        bnvar = hprebn.var(0, keepdim=True, unbiased=True)
        bnvar_inv = (bnvar + 1e-5) ** -0.5
        bnraw = (hprebn - bnmean) * bnvar_inv
        hpreact = bngain * bnraw + bnbias
        h = torch.tanh(hpreact)
        logits = h @ W2 + b2
        loss = F.cross_entropy(logits, Yb)
        # backward (the lecture's Exercise-4 solution)
        dlogits = F.softmax(logits, 1)
        dlogits[range(n), Yb] -= 1
        dlogits /= n
        dh = dlogits @ W2.T
        dW2 = h.T @ dlogits
        db2 = dlogits.sum(0)
        dhpreact = (1.0 - h**2) * dh
        dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
        dbnbias = dhpreact.sum(0, keepdim=True)
        dhprebn = (
            bngain
            * bnvar_inv
            / n
            * (n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
        )
        dembcat = dhprebn @ W1.T
        dW1 = embcat.T @ dhprebn
        db1 = dhprebn.sum(0)
        demb = dembcat.view(emb.shape)
        dC = torch.zeros_like(C)
        if loop_dc:  # the lecture's double loop
            for k in range(Xb.shape[0]):
                for j in range(Xb.shape[1]):
                    ix = Xb[k, j]
                    dC[ix] += demb[k, j]
        else:
            dC.index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))
        for p, grad in zip(params, [dC, dW1, db1, dW2, db2, dbngain, dbnbias], strict=True):
            p.data += -lr * grad
    return loss


def _autograd_step(params, Xb, Yb, lr: float) -> float:
    C, W1, b1, W2, b2, bngain, bnbias = params
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    bnmean = hprebn.mean(0, keepdim=True)
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)
    bnraw = (hprebn - bnmean) * (bnvar + 1e-5) ** -0.5
    h = torch.tanh(bngain * bnraw + bnbias)
    logits = h @ W2 + b2
    loss = F.cross_entropy(logits, Yb)
    for p in params:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in params:
            p.data += -lr * p.grad
    return loss


def _run(
    step: Callable, Xtr: np.ndarray, Ytr: np.ndarray, n_hidden: int, batch_size: int,
    steps: int, seed: int, autograd: bool, threads: int | None,
) -> dict[str, float]:  # fmt: skip
    if threads is not None:
        torch.set_num_threads(threads)
    Xt, Yt = torch.as_tensor(np.asarray(Xtr, np.int64)), torch.as_tensor(np.asarray(Ytr, np.int64))
    vocab_size = int(max(int(Yt.max()), int(Xt.max())) + 1)
    params = _init(vocab_size, 10, n_hidden, Xt.shape[1], seed)
    for p in params:
        p.requires_grad_(autograd)
    g = torch.Generator().manual_seed(seed + 1)
    loss = None
    warmup = max(1, steps // 10)
    for i in range(warmup + steps):
        if i == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        ix = torch.randint(0, Xt.shape[0], (batch_size,), generator=g)
        loss = step(params, Xt[ix], Yt[ix])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "us_per_step": wall / steps * 1e6,
        "cpu_us_per_step": cpu / steps * 1e6,
        "steps": steps,
        "final_loss": float(loss.detach()),
        "threads": torch.get_num_threads(),
    }


def lecture_loop(Xtr, Ytr, n_hidden=200, batch_size=32, steps=1000, seed=42, lr=0.1, threads=1):
    """The lecture's Exercise 4 with the Python double loop for ``dC``."""
    return _run(lambda p, X, Y: _manual_step(p, X, Y, lr, loop_dc=True),
                Xtr, Ytr, n_hidden, batch_size, steps, seed, autograd=False, threads=threads)  # noqa: E501  # fmt: skip


def vectorised_dc(Xtr, Ytr, n_hidden=200, batch_size=32, steps=1000, seed=42, lr=0.1, threads=1):
    """Exercise 4 with ``index_add_`` for ``dC`` (no Python loop)."""
    return _run(lambda p, X, Y: _manual_step(p, X, Y, lr, loop_dc=False),
                Xtr, Ytr, n_hidden, batch_size, steps, seed, autograd=False, threads=threads)  # noqa: E501  # fmt: skip


def autograd(Xtr, Ytr, n_hidden=200, batch_size=32, steps=1000, seed=42, lr=0.1, threads=1):
    """``F.cross_entropy`` and ``loss.backward()``: PyTorch's autograd in eager mode."""
    return _run(lambda p, X, Y: _autograd_step(p, X, Y, lr),
                Xtr, Ytr, n_hidden, batch_size, steps, seed, autograd=True, threads=threads)  # noqa: E501  # fmt: skip


def info() -> dict[str, object]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    from jaxninja import data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--n-hidden", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data")
    args = p.parse_args()
    _, splits = data.load_splits(args.data, block_size=3)
    Xtr, Ytr = splits["train"]
    print(info())
    for name in BASELINES:
        r = globals()[name](Xtr, Ytr, args.n_hidden, args.batch_size, args.steps)
        print(f"{name:14s} {r['us_per_step']:9.1f} us/step (cpu {r['cpu_us_per_step']:.1f})  "
              f"loss {r['final_loss']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
