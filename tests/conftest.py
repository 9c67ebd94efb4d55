"""Shared fixtures: the data file, the lecture's splits, float64 on demand, quick params,
and the training runs that several test modules read (session-scoped, built once per worker).

float64 is never switched on globally: the ``x64`` fixture turns ``jax_enable_x64`` on for
one test (``with jax.enable_x64(True)``) and restores the previous value afterwards, so
float32 tests are unaffected whatever order the tests run in.

The experiment scripts (tests/test_experiments.py) run in subprocesses that start as soon
as collection selects any of those tests: they are busy compiling for several seconds each,
and on a 2-core machine they can do that next to the (mostly single-threaded) test process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    CFG,
    FAULT,
    NO_BN,
    SHA,
    SMALL,
    TRAJ_STEPS,
    TWO_RUNS,
    VOCAB,
    host,
    params_of,
    run_chunks,
)

from jaxninja import cli
from jaxninja.lecture import data, model, ninja
from jaxninja.training import checkpoint, job, train
from jaxninja.training.train import TrainConfig, init_state

REPO = Path(__file__).resolve().parents[1]

# The lecture's init scales (the lecture's notebook), for parameters drawn with numpy: compiling
# jax.random for every shape costs seconds, numpy costs nothing. model.init_params itself
# is tested in test_model.py.
_SCALES = {"C": 1.0, "W1": (5 / 3) / 30**0.5, "b1": 0.1, "W2": 0.1, "b2": 0.1}


def names_path() -> Path:
    """names.txt: ``$JAXNINJA_DATA`` (relative to the repo; CI sets it to the shared copy),
    else the copy shipped inside the package (byte-identical, see test_data.py)."""
    env = os.environ.get("JAXNINJA_DATA")
    if env:
        p = Path(env)
        return p if p.is_absolute() else REPO / p
    return data.resolve_data_path()


@pytest.fixture(scope="session")
def names_file() -> Path:
    """The dataset; a missing file is an error, never a skip."""
    p = names_path()
    assert p.is_file(), f"names.txt not found at {p}; set JAXNINJA_DATA=/path/to/names.txt"
    return p


@pytest.fixture(scope="session")
def splits(names_file: Path) -> data.Splits:
    """names.txt's ``Splits``: ``.vocab``, ``.data`` (``{"train": (X, Y), ...}``), ``.sha256``."""
    return data.load_splits(names_file)


@pytest.fixture(scope="session")
def batch(splits: data.Splits) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``batch(n, seed=0) -> (X, Y)``: n training examples drawn with replacement."""

    def draw(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        X, Y = splits.data["train"]
        ix = np.random.default_rng(seed).integers(0, len(Y), size=n)
        return X[ix], Y[ix]

    return draw


@pytest.fixture(scope="session")
def words_file(names_file: Path, tmp_path_factory) -> Path:
    """A small words file: the first 200 names of names.txt plus the first name with each
    letter they lack, so the vocabulary is the full 27 (a temporary file)."""
    all_words = names_file.read_text().split()
    words = all_words[:200]
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if not any(letter in w for w in words):
            words.append(next(w for w in all_words if letter in w))
    p = tmp_path_factory.mktemp("data") / "words.txt"
    p.write_text("\n".join(words) + "\n")
    return p


@pytest.fixture(scope="module")
def reuse_compiled_chunks() -> Iterator[None]:
    """In this module's process, build each (config, n) training chunk once: a run that
    resumes another run's config reuses its executable instead of compiling it again
    (compiling is most of a tiny run's time). Subprocesses are not affected. Use it with
    ``pytestmark = pytest.mark.usefixtures("reuse_compiled_chunks")``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_train_chunk", functools.cache(train.make_train_chunk))
        yield


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_READ_WARNING = "Error reading persistent compilation cache entry"  # JAX's words
_MADE_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """One JAX persistent compilation cache for the whole session: the pytest-xdist workers
    and every subprocess a test starts inherit it through the environment, so a program one
    process compiled is loaded, not compiled again, by the next (compiling is most of this
    suite's time).

    JAX writes an entry in place, so a process may read one that another is still writing:
    it then warns and compiles the program itself. The warning is silenced in subprocesses
    (it would be a stray stderr line for tests that count them); in this process pytest
    records it. A process a test kills on purpose must not write here (a half-written
    entry would stay): see test_multiprocess. JAX's own lock (a size limit, with
    ``filelock``) is not used: it rescans the whole directory at every write, which cost
    more system time than the cache saves. The process that makes the directory removes
    it at the end; a cache the user set is kept."""
    if os.environ.get(CACHE_ENV):  # an xdist worker (the controller made it), or the user's
        return
    cache = tempfile.mkdtemp(prefix="jaxninja-tests-jax-cache-")
    config.stash[_MADE_CACHE] = cache
    os.environ[CACHE_ENV] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny programs too
    quiet = f"ignore:{CACHE_READ_WARNING}:UserWarning"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), quiet]))
    # this process imported JAX before the environment said so
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = config.stash.get(_MADE_CACHE, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def fault_reference(words_file: Path, tmp_path_factory) -> tuple[dict, np.ndarray]:
    """Final parameters and loss history of an uninterrupted ``helpers.FAULT`` run on
    ``words_file`` (in-process): what every interrupted and resumed run must end with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(["train", "--data", str(words_file), "--out", str(out), *FAULT]) == 0
    return params_of(out), np.load(out / "losses.npy")


@pytest.fixture
def x64() -> Iterator[None]:
    """float64 for this test only; the previous setting is restored afterwards."""
    before = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        yield
    assert jax.config.jax_enable_x64 == before


def make_params(
    seed: int, n_hidden: int, vocab_size: int = 27, dtype: str = "float64"
) -> dict[str, np.ndarray]:
    """numpy parameters with the lecture's shapes and init scales (not zeros anywhere)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "C": (vocab_size, 10),
        "W1": (30, n_hidden),
        "b1": (n_hidden,),
        "W2": (n_hidden, vocab_size),
        "b2": (vocab_size,),
    }
    p = {k: rng.standard_normal(s) * _SCALES[k] for k, s in shapes.items()}
    p["bngain"] = rng.standard_normal((1, n_hidden)) * 0.1 + 1.0
    p["bnbias"] = rng.standard_normal((1, n_hidden)) * 0.1
    return {k: v.astype(dtype) for k, v in p.items()}


@pytest.fixture(scope="session")
def params_np() -> Callable[..., dict[str, np.ndarray]]:
    """``params_np(seed, n_hidden, vocab_size=27, dtype="float64")``: see :func:`make_params`.

    Convert with ``jnp.asarray`` inside a test that has the ``x64`` fixture to keep float64.
    """
    return make_params


@jax.jit
def _all_gradients(params, X, Y):
    """Every way the project computes gradients, in one compiled program (compiling is
    what costs time in these tests, so each case is compiled once and shared)."""
    acts = ninja.forward_atomized(params, X, Y)
    grads = ninja.backward_atomized(params, acts, X, Y)
    return {
        "acts": acts,
        "ex1": grads,  # Exercise 1, by hand
        "ex1_ref": ninja.reference_grads(params, X, Y),
        "fused": {  # Exercises 2 and 3; the batch-norm rule is fed the chain's dhpreact
            "logits": ninja.cross_entropy_backward(acts["logits"], Y),
            "hprebn": ninja.batch_norm_backward(
                grads["hpreact"], params["bngain"], acts["bnvar_inv"], acts["bnraw"]
            ),
        },
        "manual": ninja.manual_grads(params, X, Y),  # Exercise 4: (loss, grads)
        "loss": jax.value_and_grad(model.loss)(params, X, Y),  # custom-VJP ops
        "reference_loss": jax.value_and_grad(model.reference_loss)(params, X, Y),
    }


@pytest.fixture(scope="session")
def f64_case(batch):
    """``f64_case(n_hidden, n, seed) -> dict``: float64 params (numpy, lecture scales), a
    real batch of ``n`` training examples and every gradient of it, as numpy arrays.

    Keys: ``params``, ``X``, ``Y`` and those of :func:`_all_gradients`. Cached per case.
    """
    cache: dict[tuple[int, int, int], dict] = {}

    def get(n_hidden: int, n: int, seed: int) -> dict:
        key = (n_hidden, n, seed)
        if key not in cache:
            X, Y = batch(n, seed)
            with jax.enable_x64(True):
                params = {k: jnp.asarray(v) for k, v in make_params(seed, n_hidden).items()}
                out = jax.device_get(_all_gradients(params, X, Y))
            cache[key] = {"params": jax.device_get(params), "X": X, "Y": Y, **out}
        return cache[key]

    return get


# ------------------------------------------------------------------ experiment scripts

EXPERIMENT_COMMANDS = {  # (the lecture's exercises are notebooks: tests/test_notebooks.py)
    "float32_rounding": ["float32_rounding.py"],
}
_experiments: dict[str, tuple[Path, subprocess.Popen]] = {}
_scratch: list[str] = []


def start_experiments() -> dict[str, tuple[Path, subprocess.Popen]]:
    """Start every script (once per session) in its own scratch directory as cwd."""
    if not _experiments:
        _scratch.append(tempfile.mkdtemp(prefix="jaxninja-experiments-"))
        env = {**os.environ, "JAXNINJA_DATA": str(names_path()), "MPLBACKEND": "Agg"}
        for name, (script, *args) in EXPERIMENT_COMMANDS.items():
            out = Path(_scratch[0], name)
            out.mkdir()
            argv = [sys.executable, str(REPO / "experiments" / script)]
            argv += [a.format(out=out) for a in args]
            proc = subprocess.Popen(
                argv,
                cwd=out,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            _experiments[name] = out, proc
    return _experiments


def pytest_collection_modifyitems(session, config, items) -> None:
    if config.option.collectonly or not names_path().is_file():
        return
    if any(i.path.name == "test_experiments.py" for i in items):
        start_experiments()


def pytest_sessionfinish(session, exitstatus) -> None:
    for _, proc in _experiments.values():  # only the processes started above
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for d in _scratch:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def experiment_runs(names_file: Path) -> dict[str, tuple[int, str, Path]]:
    """``{name: (returncode, stdout + stderr, out_dir)}`` of every experiment script."""
    results = {}
    for name, (out, proc) in start_experiments().items():
        try:
            stdout, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        results[name] = proc.returncode, stdout, out
    return results


@pytest.fixture(scope="module")
def ckpt_state():
    state = init_state(CFG, VOCAB.size)
    stats = {"mean": jnp.full((1, 8), 0.5), "var": jnp.full((1, 8), 2.0)}
    return state, stats


@pytest.fixture
def saved(tmp_path: Path, ckpt_state) -> Path:
    state, stats = ckpt_state
    checkpoint.save(tmp_path, CFG, VOCAB, state, stats, data_sha256=SHA)
    return tmp_path


# ------------------------------------------------------------------- shared training runs
# Session-scoped: each is trained at most once per pytest-xdist worker, whichever of the
# test modules that read it runs first.


@pytest.fixture(scope="session")
def train_xy(splits) -> tuple[jax.Array, jax.Array]:
    """The training split as device arrays (test_train.py, test_sweep.py)."""
    X, Y = splits.data["train"]
    return jnp.asarray(X), jnp.asarray(Y)


@pytest.fixture(scope="session")
def trajectories(train_xy):
    """300 steps of ``helpers.SMALL`` with each backend, in one chunk:
    ``{backend: (state, losses, fns)}`` (test_train.py, test_checkpoint.py)."""
    Xtr, Ytr = train_xy
    out = {}
    for backend in train.BACKENDS:
        cfg = dataclasses.replace(SMALL, backend=backend)
        fns: dict[int, object] = {}
        state, losses = run_chunks(cfg, [TRAJ_STEPS], Xtr, Ytr, fns=fns)
        out[backend] = (state, losses, fns)
    return out


@pytest.fixture(scope="session")
def trained(trajectories, train_xy):
    """The custom_vjp trajectory continued to 2,100 steps (the same compiled chunk, run
    7 times): ``(params, calibrated bn_stats, losses)`` (test_train.py, test_sample.py,
    test_checkpoint.py)."""
    Xtr, Ytr = train_xy
    state0, losses0, fns = trajectories["custom_vjp"]
    state = jax.tree.map(jnp.asarray, state0)
    losses = [losses0]
    for _ in range(6):
        state, chunk_losses = fns[TRAJ_STEPS](state, Xtr, Ytr)
        losses.append(np.asarray(chunk_losses))
    assert int(state.step) == 7 * TRAJ_STEPS
    params = host(state.params)
    bn_stats = host(train.calibrate_bn(state.params, Xtr))
    return params, bn_stats, np.concatenate(losses)


@pytest.fixture(scope="session")
def no_bn_run(tmp_path_factory, names_file):
    """A ``helpers.NO_BN`` run (300 steps without batch norm, evaluated every 100 steps):
    ``(dir, metrics)`` (test_job.py, test_metrics.py, test_cli.py)."""
    out = tmp_path_factory.mktemp("nobn") / "run"
    m = job.train_run(NO_BN, out, names_file, log=lambda line: None, num_samples=0)
    return out, m


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, names_file):
    """Two finished ``helpers.TWO_RUNS`` runs that differ in batch norm and lr:
    ``[bn, no_bn]`` (test_compare.py, test_diagnose.py)."""
    root = tmp_path_factory.mktemp("runs")
    quiet = dict(log=lambda line: None, num_samples=0)
    job.train_run(TWO_RUNS, root / "bn", names_file, **quiet)
    no_bn = TrainConfig(**{**TWO_RUNS.to_dict(), "batch_norm": False, "lr": 0.05})
    job.train_run(no_bn, root / "no_bn", names_file, **quiet)
    return [root / "bn", root / "no_bn"]


@pytest.fixture(scope="session")
def base_run(words_file, tmp_path_factory) -> Path:
    """A finished tiny run on ``words_file`` (n_hidden 16, 2 chunks of 1 step; tests copy it
    with ``run_copy`` before changing anything) (test_reliability.py, test_rundir.py,
    test_checkpoint.py)."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = TrainConfig(n_hidden=16, steps=2, chunk_steps=1)
    job.train_run(cfg, out, words_file, log=lambda s: None, num_samples=0)
    return out


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    """A copy of ``base_run`` in this test's ``tmp_path``, free to change."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out
