"""PyTorch baselines for ``jaxninja bench``: the lecture's Exercise 4, timed in eager mode.

The same network, data, batch size, init and SGD (lr 0.1), drawing each minibatch with
``torch.randint`` as in the lecture: ``lecture_loop`` (manual backward pass, Python double
loop for ``dC``), ``vectorised_dc`` (``dC.index_add_``), ``autograd`` (``loss.backward()``).
One intra-op thread: on 2 cores shared with JAX, OpenMP's spinning made 2 threads 10-25x
slower than 1. torch is optional (``pip install 'jaxninja[bench]'``): else ``torch = None``.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

# Imported only when installed, so that this module always imports (doctests, --help).
torch: Any = importlib.import_module("torch") if importlib.util.find_spec("torch") else None
F: Any = None if torch is None else torch.nn.functional
SEED, LR = 42, 0.1


def _init(vocab_size: int, n_embd: int, n_hidden: int, block_size: int) -> list:
    """The lecture's Exercise-4 parameters ``C, W1, b1, W2, b2, bngain, bnbias``."""
    g = torch.Generator().manual_seed(SEED)
    fan_in = n_embd * block_size

    def small(*shape: int) -> Any:
        return torch.randn(shape, generator=g) * 0.1

    C = torch.randn((vocab_size, n_embd), generator=g)
    W1 = torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / fan_in**0.5
    b1, W2, b2 = small(n_hidden), small(n_hidden, vocab_size), small(vocab_size)
    return [C, W1, b1, W2, b2, small(1, n_hidden) + 1.0, small(1, n_hidden)]


def _forward(params: list, Xb: Any) -> tuple[Any, ...]:
    """The lecture's forward pass: ``emb, embcat, bnraw, bnvar_inv, h, logits``."""
    C, W1, b1, W2, b2, bngain, bnbias = params
    emb = C[Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ W1 + b1
    bnmean = hprebn.mean(0, keepdim=True)
    bnvar_inv = (hprebn.var(0, keepdim=True, unbiased=True) + 1e-5) ** -0.5
    bnraw = (hprebn - bnmean) * bnvar_inv
    h = torch.tanh(bngain * bnraw + bnbias)
    return emb, embcat, bnraw, bnvar_inv, h, h @ W2 + b2


def _manual_step(params: list, Xb: Any, Yb: Any, lr: float, loop_dc: bool) -> Any:
    """One step of the lecture's Exercise 4: forward, manual backward (its solution), SGD."""
    C, W1, _, W2, _, bngain, _ = params
    n = Xb.shape[0]
    with torch.no_grad():
        emb, embcat, bnraw, bnvar_inv, h, logits = _forward(params, Xb)
        loss = F.cross_entropy(logits, Yb)
        dlogits = F.softmax(logits, 1)
        dlogits[range(n), Yb] -= 1
        dlogits /= n
        dhpreact = (1.0 - h**2) * (dlogits @ W2.T)
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
        grads = [dC, embcat.T @ dhprebn, dhprebn.sum(0), h.T @ dlogits, dlogits.sum(0)]
        for p, grad in zip(params, [*grads, dsum_raw.view(1, -1), dsum.view(1, -1)], strict=True):
            p.data += -lr * grad
    return loss


def _autograd_step(params: list, Xb: Any, Yb: Any, lr: float) -> Any:
    loss = F.cross_entropy(_forward(params, Xb)[-1], Yb)
    for p in params:
        p.grad = None
    loss.backward()
    with torch.no_grad():
        for p in params:
            p.data += -lr * p.grad
    return loss


STEPS: dict[str, tuple[Callable[..., Any], bool]] = {  # name -> (step, needs autograd)
    "lecture_loop": (partial(_manual_step, loop_dc=True), False),
    "vectorised_dc": (partial(_manual_step, loop_dc=False), False),
    "autograd": (_autograd_step, True),
}
BASELINES = tuple(STEPS)


def run_baseline(
    name: str, X: np.ndarray, Y: np.ndarray, vocab_size: int, n_hidden: int, batch: int, steps: int
) -> dict[str, float]:
    """Time ``steps`` steps of baseline ``name`` after ``steps // 10`` warm-up steps."""
    step, autograd = STEPS[name]
    torch.set_num_threads(1)
    Xt, Yt = torch.as_tensor(np.asarray(X, np.int64)), torch.as_tensor(np.asarray(Y, np.int64))
    params = [p.requires_grad_(autograd) for p in _init(vocab_size, 10, n_hidden, Xt.shape[1])]
    g = torch.Generator().manual_seed(SEED + 1)

    def train(n: int) -> Any:
        for _ in range(n):
            ix = torch.randint(0, Xt.shape[0], (batch,), generator=g)
            loss = step(params, Xt[ix], Yt[ix], LR)
        return loss

    train(max(1, steps // 10))
    t0, c0 = time.perf_counter(), time.process_time()
    loss = train(steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"us_per_step": wall / steps * 1e6, "cpu_us_per_step": cpu / steps * 1e6, "steps": steps}
    return out | {"final_loss": float(loss.detach()), "threads": torch.get_num_threads()}
