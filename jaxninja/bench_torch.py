"""PyTorch baselines for ``jaxninja bench``: the lecture's Exercise 4, timed in eager mode.

Three ways to train the same network (same data, batch size, hidden size, init scales,
SGD with lr 0.1) in PyTorch, each returning microseconds per training step:

* ``lecture_loop``: the lecture's Exercise-4 loop with the manual backward pass and
  its Python double loop for ``dC`` (``for k ...: for j ...: dC[ix] += demb[k, j]``);
* ``vectorised_dc``: the same loop with ``dC.index_add_(0, Xb.view(-1), demb...)``;
* ``autograd``: the usual ``F.cross_entropy`` + ``loss.backward()`` loop.

Every step includes drawing the minibatch (``torch.randint``), as in the lecture. Each
baseline runs with one intra-op thread: these tensors are far below torch's parallel grain
size, and on a 2-core machine shared with JAX's thread pool OpenMP's spinning threads made
2 threads 10-25x slower than 1. torch is optional (``pip install 'jaxninja[bench]'``):
without it ``torch`` here is ``None`` and :mod:`jaxninja.bench` leaves the PyTorch rows out.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# Imported only when installed, so that this module always imports (doctests, --help).
torch: Any = importlib.import_module("torch") if importlib.util.find_spec("torch") else None
F: Any = None if torch is None else torch.nn.functional

BASELINES = ("lecture_loop", "vectorised_dc", "autograd")


def _init(vocab_size: int, n_embd: int, n_hidden: int, block_size: int, seed: int) -> list:
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


def _manual_step(params: list, Xb: Any, Yb: Any, lr: float, loop_dc: bool) -> Any:
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
        h = torch.tanh(bngain * bnraw + bnbias)
        logits = h @ W2 + b2
        loss = F.cross_entropy(logits, Yb)
        # backward (the lecture's Exercise-4 solution)
        dlogits = F.softmax(logits, 1)
        dlogits[range(n), Yb] -= 1
        dlogits /= n
        dh = dlogits @ W2.T
        dhpreact = (1.0 - h**2) * dh
        dsum, dsum_raw = dhpreact.sum(0), (dhpreact * bnraw).sum(0)
        dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dsum - n / (n - 1) * bnraw * dsum_raw)
        demb = (dhprebn @ W1.T).view(emb.shape)
        dC = torch.zeros_like(C)
        if loop_dc:  # the lecture's double loop
            for k in range(Xb.shape[0]):
                for j in range(Xb.shape[1]):
                    dC[Xb[k, j]] += demb[k, j]
        else:
            dC.index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))
        grads = [
            dC,
            embcat.T @ dhprebn,
            dhprebn.sum(0),
            h.T @ dlogits,
            dlogits.sum(0),
            dsum_raw.view(1, -1),
            dsum.view(1, -1),
        ]
        for p, grad in zip(params, grads, strict=True):
            p.data += -lr * grad
    return loss


def _autograd_step(params: list, Xb: Any, Yb: Any, lr: float) -> Any:
    C, W1, b1, W2, b2, bngain, bnbias = params
    emb = C[Xb]
    hprebn = emb.view(emb.shape[0], -1) @ W1 + b1
    bnmean = hprebn.mean(0, keepdim=True)
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)
    bnraw = (hprebn - bnmean) * (bnvar + 1e-5) ** -0.5
    h = torch.tanh(bngain * bnraw + bnbias)
    loss = F.cross_entropy(h @ W2 + b2, Yb)
    for p in params:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in params:
            p.data += -lr * p.grad
    return loss


STEPS: dict[str, tuple[Callable[..., Any], bool]] = {
    "lecture_loop": (lambda p, X, Y, lr: _manual_step(p, X, Y, lr, loop_dc=True), False),
    "vectorised_dc": (lambda p, X, Y, lr: _manual_step(p, X, Y, lr, loop_dc=False), False),
    "autograd": (_autograd_step, True),
}
"""Baseline name -> (step function, whether the parameters need autograd)."""


def run_baseline(
    name: str,
    Xtr: np.ndarray,
    Ytr: np.ndarray,
    vocab_size: int,
    *,
    n_hidden: int = 200,
    batch_size: int = 32,
    steps: int = 1000,
    seed: int = 42,
    lr: float = 0.1,
) -> dict[str, float]:
    """Train ``steps`` steps of baseline ``name`` (after ``steps // 10`` warm-up steps):
    ``{"us_per_step", "cpu_us_per_step", "steps", "final_loss", "threads"}``."""
    step, autograd = STEPS[name]
    torch.set_num_threads(1)
    Xt, Yt = torch.as_tensor(np.asarray(Xtr, np.int64)), torch.as_tensor(np.asarray(Ytr, np.int64))
    params = _init(vocab_size, 10, n_hidden, Xt.shape[1], seed)
    for p in params:
        p.requires_grad_(autograd)
    g = torch.Generator().manual_seed(seed + 1)
    warmup = max(1, steps // 10)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(warmup + steps):
        if i == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        ix = torch.randint(0, Xt.shape[0], (batch_size,), generator=g)
        loss = step(params, Xt[ix], Yt[ix], lr)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "us_per_step": wall / steps * 1e6,
        "cpu_us_per_step": cpu / steps * 1e6,
        "steps": steps,
        "final_loss": float(loss.detach()),
        "threads": torch.get_num_threads(),
    }


def version() -> str:
    return str(torch.__version__)
