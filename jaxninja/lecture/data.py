"""The names dataset: the data file, its words, the vocabulary and the lecture's examples,
as in makemore ('.' is token 0; the ``random.seed(42); random.shuffle`` split) but without
global state. ``names.txt`` (from karpathy/makemore, MIT) ships as package data."""

from __future__ import annotations

import hashlib
import json
import operator
import os
import random
import stat
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from jaxninja.errors import JaxninjaError
from jaxninja.limits import check_int

NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
# names.txt is 228 kB; a file over 1 GiB is a mistake (or /dev/zero), not a word list.
MAX_BYTES = 1 << 30
PathArg = str | os.PathLike[str]
Examples = tuple[np.ndarray, np.ndarray]  # X (N, block_size) and Y (N,), int32
# Peak memory of build_dataset per example (Python lists, then the int32 arrays), measured
# with tracemalloc: 104 + 12 * block_size bytes on names.txt (block sizes 1, 3, 8, 32), up
# to 2% more on a slice of it; tests/test_data.py checks the bound.
BUILD_BYTES = (108, 12)  # bytes per example: 108 + 12 * block_size
_KINDS = {"d": "a directory", "p": "a FIFO", "c": "a character device", "s": "a socket"}
_DOT = "'.', which is reserved as the start/end token"


class DataError(JaxninjaError):
    """A problem with the data file; the one-line message names it (and the line)."""


class UnknownCharError(KeyError, ValueError):
    """A character that is not in the vocabulary (both a ``KeyError`` and a ``ValueError``)."""

    __str__ = ValueError.__str__  # KeyError's would repr() the message


JOINERS = frozenset("\u200c\u200d")  # zero-width (non-)joiner: spelling in Persian, Indic


def is_control(ch: str) -> bool:
    """Whether ``ch`` is a control, format or line-separator character (never in a name),
    but for the zero-width joiners of ``JOINERS``, which ordinary names contain.

    Examples:
      >>> is_control("\x1b"), is_control("\u202e"), is_control("\u200c")
      (True, True, False)
    """
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch not in JOINERS


def resolve_data_path(path: PathArg | None = None) -> Path:
    """The data file: ``path`` if given, else ``$JAXNINJA_DATA`` if set and non-empty, else
    the ``names.txt`` shipped inside the package (found with ``importlib.resources``).

    Examples:
      >>> print(resolve_data_path("my_names.txt"))
      my_names.txt
    """
    if path is None:
        path = os.environ.get("JAXNINJA_DATA") or str(resources.files("jaxninja") / "names.txt")
    return Path(path)


def _read_bytes(p: Path) -> bytes:
    """The bytes of the regular file ``p``; anything else is refused before reading."""
    try:
        mode = os.stat(p).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.filemode(mode)[0], "a special file")
            raise DataError(f"{p}: not a file (it is {kind})")
        # Swapped for a FIFO or a device after the stat: O_NONBLOCK and the cap still hold.
        with open(os.open(p, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            data = f.read(MAX_BYTES + 1)  # + 1: a file that grew while being read
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise DataError(f"{p}: file is over {MAX_BYTES} bytes, too big for a word list")
    return data


def _read_words(p: Path) -> tuple[list[str], bytes]:
    """The words of the file ``p`` (see ``load_words``) and its bytes."""
    data = raw = _read_bytes(p)
    if not data:
        raise DataError(f"{p}: file is empty")
    # LF, CRLF, CR end lines (ASCII, never inside a UTF-8 character: offsets stay right).
    data = data.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{p}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x})") from e
    refused = {c for c in set(text) if c == "." or is_control(c)}  # one look-up per character
    lines = [line.strip() for line in text.split("\n")]
    for lineno, word in enumerate(lines, start=1):
        if bad := next((c for c in word if c in refused), ""):
            why = _DOT if bad == "." else f"the control character U+{ord(bad):04X}"
            shown = repr(word[:40]) + ("..." if len(word) > 40 else "")
            raise DataError(f"{p}: line {lineno}: word {shown} contains {why}")
    if not (words := [w for w in lines if w]):
        raise DataError(f"{p}: file has no words (only blank lines)")
    return words, raw


def load_words(path: PathArg | None = None) -> list[str]:
    """The stripped, non-blank lines of the data file chosen by ``resolve_data_path``:
    UTF-8 (LF, CRLF or CR; a BOM is ignored), at most ``MAX_BYTES``. '.', control
    characters and any problem with the file raise ``DataError`` (file and line).

    Examples:
      >>> load_words(resources.files("jaxninja") / "names.txt")[:3]
      ['emma', 'olivia', 'ava']
    """
    return _read_words(resolve_data_path(path))[0]


@dataclass(frozen=True)
class Vocab:
    """Characters <-> integer ids (makemore's ``itos``/``stoi``); ``itos[0]`` is '.', and
    every entry is a distinct single non-control character (``ValueError`` otherwise).

    Examples:
      >>> v = Vocab.from_words(["emma", "ava"])
      >>> v.itos, v.size, v.stoi["m"]
      (('.', 'a', 'e', 'm', 'v'), 5, 3)
      >>> v.encode("ava"), v.decode([2, 3, 3, 1, 0])
      ([1, 4, 1], 'emma.')
    """

    itos: tuple[str, ...]
    _stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.itos or self.itos[0] != ".":
            raise ValueError(f"vocabulary must start with '.', got {self.itos[:1]!r}")
        for i, s in enumerate(self.itos):
            if not isinstance(s, str) or len(s) != 1:
                raise ValueError(f"vocabulary entry {i} must be a single character, got {s!r}")
            if is_control(s):
                raise ValueError(f"vocabulary entry {i} is the control character U+{ord(s):04X}")
        stoi = {s: i for i, s in enumerate(self.itos)}
        if len(stoi) != len(self.itos):
            dups = sorted({s for i, s in enumerate(self.itos) if stoi[s] != i})
            raise ValueError(f"vocabulary has {len(dups)} duplicate entries: {dups[:5]!r}")
        object.__setattr__(self, "_stoi", stoi)

    @property
    def stoi(self) -> Mapping[str, int]:
        """Character -> id (a read-only view)."""
        return MappingProxyType(self._stoi)

    @property
    def size(self) -> int:
        """Number of symbols, '.' included."""
        return len(self.itos)

    @classmethod
    def from_words(cls, words: Iterable[str]) -> Vocab:
        """'.' is id 0; the sorted set of characters in ``words`` gets ids 1..N."""
        chars = sorted(set("".join(words)))
        if "." in chars:
            raise ValueError(f"words must not contain {_DOT}")
        return cls((".", *chars))

    def encode(self, s: str) -> list[int]:
        """Ids of the characters of ``s``; an unknown one raises ``UnknownCharError``."""
        if ch := next((c for c in s if c not in self._stoi), ""):
            raise UnknownCharError(f"character {ch!r} (U+{ord(ch):04X}) is not in the vocabulary")
        return [self._stoi[c] for c in s]

    def decode(self, ids: Iterable[int]) -> str:
        """The string for ``ids`` (id 0 decodes to '.'); out-of-range ids raise ``ValueError``."""
        js = [operator.index(i) for i in ids]
        if bad := [j for j in js if not 0 <= j < self.size]:
            raise ValueError(f"id {bad[0]} is out of range for a vocabulary of size {self.size}")
        return "".join(self.itos[j] for j in js)

    def to_json(self) -> str:
        """A JSON list of the symbols: ``'[".", "a"]'``."""
        return json.dumps(list(self.itos))

    @classmethod
    def from_json(cls, text: str | bytes) -> Vocab:
        """Inverse of ``to_json``; validates and raises ``ValueError`` on bad input."""
        try:
            itos = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"vocabulary is not valid JSON: {e}") from e
        if not isinstance(itos, list):
            raise ValueError(f"vocabulary JSON must be a list, got {type(itos).__name__}")
        return cls(tuple(itos))


def build_dataset(words: Sequence[str], vocab: Vocab, block_size: int = 3) -> Examples:
    """The lecture's examples: int32 ``X`` (N, block_size) and ``Y`` (N,), makemore's loop.

    For each word the context starts as ``[0] * block_size``; for each character of
    ``word + '.'`` the pair (context, id) is emitted and the context slides left by one.

    Examples:
      >>> v = Vocab.from_words(["emma"])
      >>> X, Y = build_dataset(["emma"], v, block_size=2)
      >>> X.tolist(), Y.tolist()
      ([[0, 0], [0, 2], [2, 3], [3, 3], [3, 1]], [2, 3, 3, 1, 0])
    """
    if isinstance(words, str):
        raise TypeError("build_dataset expects a list of words, not a single string")
    check_int("block_size", block_size)
    if any("." in w for w in words):
        raise ValueError(f"words must not contain {_DOT}")
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ix in vocab.encode(w + "."):
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return np.array(X, np.int32).reshape(-1, block_size), np.array(Y, np.int32)


def split_words(
    words: Sequence[str], seed: int = 42, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> tuple[list[str], list[str], list[str]]:
    """The lecture's train/val/test split, without mutating ``words`` or the global RNG.

    Same permutation as ``random.seed(seed); random.shuffle(words)``; then
    ``n1 = int(f0 * n)`` and ``n2 = int((f0 + f1) * n)`` (0.8 / 0.9 by default).

    Examples:
      >>> tr, va, te = split_words([f"w{i}" for i in range(10)])
      >>> len(tr), len(va), len(te)
      (8, 1, 1)
    """
    fr = tuple(fractions)
    numbers = all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fr)
    if not (len(fr) == 3 and numbers and all(f >= 0 for f in fr)) or abs(sum(fr) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fr!r}")
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n1, n2 = int(fr[0] * len(shuffled)), int((fr[0] + fr[1]) * len(shuffled))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


class Splits(NamedTuple):
    """``load_splits``' result: ``vocab`` (of all words), ``data``
    (``{"train" | "val" | "test": (X, Y)}``, int32) and ``sha256`` (of the file's bytes)."""

    vocab: Vocab
    data: dict[str, Examples]
    sha256: str


def physical_memory() -> int | None:
    """This machine's memory in bytes (``None`` where the OS does not say).

    Examples:
      >>> (physical_memory() or 1) > 0
      True
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_build_memory(p: PathArg, n_examples: int, block_size: int) -> None:
    """Raise ``DataError`` when building ``n_examples`` examples of ``block_size``
    (``BUILD_BYTES`` each) would take over 80% of this machine's memory."""
    need = n_examples * (BUILD_BYTES[0] + BUILD_BYTES[1] * block_size)
    have = physical_memory()
    if have is not None and need > 0.8 * have:
        raise DataError(
            f"{p}: building its {n_examples:,} examples with --block-size {block_size} needs "
            f"about {need / (1 << 30):,.1f} GiB of memory and the machine has "
            f"{have / (1 << 30):.1f} GiB; use a smaller data file or --block-size"
        )


def load_splits(path: PathArg | None = None, block_size: int = 3, seed: int = 42) -> Splits:
    """Words -> vocabulary (from *all* words) -> lecture split -> examples for each split.

    A file whose training split would be empty raises ``DataError`` (val and test
    may be), as does one whose examples would not fit in memory (checked before they are
    built: ``check_build_memory``). On the packaged names.txt:

    Examples:
      >>> s = load_splits(resources.files("jaxninja") / "names.txt")
      >>> s.vocab.size, {k: x.shape for k, (x, y) in s.data.items()}, s.sha256 == NAMES_SHA256
      (27, {'train': (182625, 3), 'val': (22655, 3), 'test': (22866, 3)}, True)
    """
    p = resolve_data_path(path)
    words, raw = _read_words(p)
    vocab = Vocab.from_words(words)
    parts = dict(zip(("train", "val", "test"), split_words(words, seed=seed), strict=True))
    if not parts["train"]:
        raise DataError(f"{p}: the training split is empty (the file needs more words)")
    check_build_memory(p, sum(len(w) + 1 for w in words), operator.index(block_size))
    data = {k: build_dataset(ws, vocab, block_size) for k, ws in parts.items()}
    return Splits(vocab, data, hashlib.sha256(raw).hexdigest())
