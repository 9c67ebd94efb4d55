"""The names dataset: the data file, its words, the vocabulary and the lecture's examples.

As in makemore ('.' is token 0, the start and end of a name; the split is
``random.seed(42); random.shuffle``) but without global state. ``names.txt`` (from
karpathy/makemore, MIT) ships as package data: no network needed.
"""

from __future__ import annotations

import hashlib
import json
import math
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

NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
# names.txt is 228 kB; a file over 1 GiB is a mistake (or /dev/zero), not a word list.
MAX_BYTES = 1 << 30
# Never in a vocabulary (nor on a terminal): controls (NUL, ESC), format marks, line breaks.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_DOT = "'.', which is reserved as the start/end token"
_KINDS = {"d": "a directory", "p": "a FIFO", "c": "a character device", "s": "a socket"}


class DataError(JaxninjaError):
    """A problem with the data file; the one-line message names it (and the line)."""


class UnknownCharError(KeyError, ValueError):
    """A character that is not in the vocabulary (both a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def is_control(ch: str) -> bool:
    """Whether ``ch`` is a control, format or line-separator character (never a name's)."""
    return unicodedata.category(ch) in _CONTROL_CATEGORIES


def resolve_data_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The data file: ``path`` if given, else ``$JAXNINJA_DATA`` if set and non-empty, else
    the ``names.txt`` shipped inside the package (found with :mod:`importlib.resources`).

    >>> print(resolve_data_path("my_names.txt"))
    my_names.txt
    """
    if path is not None:
        return Path(path)
    env = os.environ.get("JAXNINJA_DATA")
    if env:
        return Path(env)
    return Path(str(resources.files("jaxninja") / "names.txt"))


def _read_bytes(p: Path) -> bytes:
    """The bytes of the regular file ``p``; anything else is refused before reading
    (``O_NONBLOCK``: a FIFO must not wait for a writer; the cap stops ``/dev/zero``-likes)."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = _KINDS.get(stat.filemode(mode)[0], "a special file")
                raise DataError(f"{p}: not a file (it is {kind})")
            with open(fd, "rb", closefd=False) as f:
                data = f.read(MAX_BYTES + 1)  # + 1: a file that grew while being read
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise DataError(f"{p}: file is over {MAX_BYTES} bytes, too big for a word list")
    return data


def _show(word: str) -> str:
    """A word for an error message: repr-escaped (no control characters) and short."""
    return repr(word) if len(word) <= 40 else repr(word[:40]) + "..."


def _parse_words(p: Path, data: bytes) -> list[str]:
    """Words of ``data`` (the contents of ``p``), one per line; see :func:`load_words`."""
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
    words = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        word = raw.strip()
        bad = next((c for c in word if c in refused), None)
        if bad is not None:
            why = _DOT if bad == "." else f"the control character U+{ord(bad):04X}"
            raise DataError(f"{p}: line {lineno}: word {_show(word)} contains {why}")
        if word:
            words.append(word)
    if not words:
        raise DataError(f"{p}: file has no words (only blank lines)")
    return words


def load_words(path: str | os.PathLike[str] | None = None) -> list[str]:
    """One word per line of the data file chosen by :func:`resolve_data_path`.

    A regular file of at most :data:`MAX_BYTES` in UTF-8 (a BOM is ignored), lines ending
    in LF, CRLF or CR, stripped, blank ones dropped. Any other character becomes part of
    the vocabulary, but '.' (the terminator) and control characters raise
    :class:`DataError` naming the file and the line, as does any problem with the file.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = Path(tmp, "names.txt")
    ...     _ = p.write_bytes(b"emma\\r\\n  Zoe \\r\\n\\r\\nolivia\\n\\n")
    ...     load_words(p)
    ['emma', 'Zoe', 'olivia']
    """
    p = resolve_data_path(path)
    return _parse_words(p, _read_bytes(p))


@dataclass(frozen=True)
class Vocab:
    """Characters <-> integer ids.  ``itos[0]`` is always '.', the start/end token.

    ``stoi`` is a read-only mapping built once. Invalid ``itos`` (not single characters,
    duplicates, control characters) raise ``ValueError``.

    >>> v = Vocab.from_words(["emma", "ava"])
    >>> v.itos, v.size, v.stoi["m"]
    (('.', 'a', 'e', 'm', 'v'), 5, 3)
    >>> v.encode("ava"), v.decode([2, 3, 3, 1, 0])
    ([1, 4, 1], 'emma.')
    >>> Vocab.from_json(v.to_json()) == v
    True
    """

    itos: tuple[str, ...]
    _stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        itos = tuple(self.itos)
        if not itos or itos[0] != ".":
            raise ValueError(f"vocabulary must start with '.', got {itos[:1]!r}")
        for i, s in enumerate(itos):
            if not isinstance(s, str) or len(s) != 1:
                raise ValueError(f"vocabulary entry {i} must be a single character, got {s!r}")
            if is_control(s):
                raise ValueError(f"vocabulary entry {i} is the control character U+{ord(s):04X}")
        stoi = {s: i for i, s in enumerate(itos)}
        if len(stoi) != len(itos):
            dups = sorted({s for i, s in enumerate(itos) if stoi[s] != i})
            raise ValueError(f"vocabulary has {len(dups)} duplicate entries: {dups[:5]!r}")
        object.__setattr__(self, "itos", itos)
        object.__setattr__(self, "_stoi", stoi)

    @property
    def stoi(self) -> Mapping[str, int]:
        """Character -> id (a read-only view of a dict built once)."""
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
            raise ValueError("words must not contain '.', the start/end token")
        return cls(tuple([".", *chars]))

    def encode(self, s: str) -> list[int]:
        """Ids of the characters of ``s``; an unknown one raises :class:`UnknownCharError`."""
        try:
            return [self._stoi[c] for c in s]
        except KeyError as e:
            ch = e.args[0]
            msg = f"character {ch!r} (U+{ord(ch):04X}) is not in the vocabulary"
        raise UnknownCharError(msg)

    def decode(self, ids: Iterable[int]) -> str:
        """The string for ``ids`` (id 0 decodes to '.'); out-of-range ids raise ``ValueError``."""
        js = [operator.index(i) for i in ids]
        bad = [j for j in js if not 0 <= j < self.size]
        if bad:
            raise ValueError(f"id {bad[0]} is out of range for a vocabulary of size {self.size}")
        return "".join(self.itos[j] for j in js)

    def to_json(self) -> str:
        """A JSON list of the symbols, for checkpoints: ``'[".", "a"]'``."""
        return json.dumps(list(self.itos))

    @classmethod
    def from_json(cls, text: str | bytes) -> Vocab:
        """Inverse of :meth:`to_json`; validates and raises ``ValueError`` on bad input."""
        try:
            itos = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"vocabulary is not valid JSON: {e}") from e
        if not isinstance(itos, list):
            raise ValueError(f"vocabulary JSON must be a list, got {type(itos).__name__}")
        return cls(tuple(itos))


def build_dataset(
    words: Sequence[str], vocab: Vocab, block_size: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """The lecture's examples: int32 ``X`` (N, block_size) and ``Y`` (N,), makemore's loop.

    For each word the context starts as ``[0] * block_size``; for each character of
    ``word + '.'`` the pair (context, id) is emitted and the context slides left by one.

    >>> v = Vocab.from_words(["emma"])
    >>> X, Y = build_dataset(["emma"], v, block_size=2)
    >>> X.tolist(), Y.tolist()
    ([[0, 0], [0, 2], [2, 3], [3, 3], [3, 1]], [2, 3, 3, 1, 0])
    """
    if isinstance(words, str):
        raise TypeError("build_dataset expects a list of words, not a single string")
    if operator.index(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = sum(len(w) + 1 for w in words)
    X, Y = np.zeros((n, block_size), np.int32), np.zeros(n, np.int32)  # 1/5 the memory of lists
    i = 0
    for w in words:
        if "." in w:
            raise ValueError(f"word {_show(w)} contains '.', the start/end token")
        context = [0] * block_size
        for ix in vocab.encode(w + "."):
            X[i], Y[i] = context, ix
            context = context[1:] + [ix]
            i += 1
    return X, Y


def split_words(
    words: Sequence[str],
    seed: int = 42,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> tuple[list[str], list[str], list[str]]:
    """The lecture's train/val/test split, without mutating ``words`` or the global RNG.

    Same permutation as ``random.seed(seed); random.shuffle(words)``; then
    ``n1 = int(f0 * n)`` and ``n2 = int((f0 + f1) * n)`` (0.8 / 0.9 by default).

    >>> tr, va, te = split_words([f"w{i}" for i in range(10)])
    >>> len(tr), len(va), len(te)
    (8, 1, 1)
    """
    fr = tuple(fractions)
    numbers = all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fr)
    if not (len(fr) == 3 and numbers and all(f >= 0 for f in fr)) or abs(math.fsum(fr) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fr!r}")
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n1 = int(fr[0] * n)
    n2 = min(n, int((fr[0] + fr[1]) * n))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


class Splits(NamedTuple):
    """:func:`load_splits`' result, read by attribute: ``vocab`` (of all words), ``data``
    (``{"train" | "val" | "test": (X, Y)}``, int32) and ``sha256`` (of the file's bytes)."""

    vocab: Vocab
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    sha256: str


def load_splits(
    path: str | os.PathLike[str] | None = None, block_size: int = 3, seed: int = 42
) -> Splits:
    """Words -> vocabulary (from *all* words) -> lecture split -> examples for each split.

    On names.txt this gives 182,625 / 22,655 / 22,866 train/val/test examples. A file
    whose training split would be empty raises :class:`DataError` (val and test may be).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = Path(tmp, "names.txt")
    ...     _ = p.write_text("\\n".join(["emma", "ava", "bob", "ada"] * 5))
    ...     s = load_splits(p)
    >>> s.vocab.size, {k: len(y) for k, (x, y) in s.data.items()}, s.sha256[:8]
    (8, {'train': 67, 'val': 9, 'test': 9}, '2e4b3585')
    """
    p = resolve_data_path(path)
    words = _parse_words(p, raw := _read_bytes(p))
    vocab = Vocab.from_words(words)
    parts = dict(zip(("train", "val", "test"), split_words(words, seed=seed), strict=True))
    if not parts["train"]:
        raise DataError(f"{p}: the training split is empty (the file needs more words)")
    data = {k: build_dataset(ws, vocab, block_size) for k, ws in parts.items()}
    return Splits(vocab, data, hashlib.sha256(raw).hexdigest())
