"""The names dataset: finding/downloading it, loading words, the vocabulary and the examples.

Everything here follows Karpathy's makemore lectures exactly ('.' is token 0 and marks both
the start and the end of a name; the splits come from ``random.seed(42); random.shuffle``)
but never touches global state.  Only numpy is needed.

>>> vocab = Vocab.from_words(["emma", "ava"])
>>> X, Y = build_dataset(["emma"], vocab, block_size=3)
>>> X.tolist()[:2], Y.tolist()[:2]
([[0, 0, 0], [0, 0, 2]], [2, 3])
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import operator
import os
import random
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, NamedTuple

import numpy as np

from jaxninja import fileio

__all__ = [
    "DEFAULT_URL",
    "NAMES_SHA256",
    "DataError",
    "Splits",
    "UnknownCharError",
    "Vocab",
    "build_dataset",
    "cache_dir",
    "download_names",
    "load_splits",
    "load_words",
    "resolve_data_path",
    "split_words",
]

DEFAULT_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"

_HOW_TO_PASS = "pass a local copy instead with --data PATH or JAXNINJA_DATA=PATH"
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


class DataError(ValueError):
    """A problem with the data (missing, unreadable or malformed file, failed download).

    The message is a single line naming the file (and the line number where relevant).

    >>> try:
    ...     load_words("/nonexistent/names.txt")
    ... except DataError as e:
    ...     print(e)
    /nonexistent/names.txt: no such file
    """


class UnknownCharError(KeyError, ValueError):
    """A character that is not in the vocabulary (both a ``KeyError`` and a ``ValueError``).

    >>> try:
    ...     Vocab.from_words(["ab"]).encode("aZ")
    ... except UnknownCharError as e:
    ...     print(e)
    character 'Z' (U+005A) is not in the vocabulary
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _one_line(x: object) -> str:
    return " ".join(str(x).split())


def _unknown_char(ch: str) -> UnknownCharError:
    return UnknownCharError(f"character {ch!r} (U+{ord(ch):04X}) is not in the vocabulary")


def _env(name: str) -> str | None:
    """An environment variable, with the empty string treated as unset."""
    return os.environ.get(name) or None


def cache_dir() -> Path:
    """Where downloads go: ``$JAXNINJA_CACHE``, else ``$XDG_CACHE_HOME/jaxninja``,
    else ``~/.cache/jaxninja`` (empty variables count as unset; nothing is created).

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"JAXNINJA_CACHE": "/tmp/jx-cache"}):
    ...     print(cache_dir().as_posix())
    /tmp/jx-cache
    """
    explicit = _env("JAXNINJA_CACHE")
    if explicit is not None:
        return Path(explicit).expanduser()
    xdg = _env("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg is not None else Path.home() / ".cache"
    return base / "jaxninja"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def download_names(
    url: str = DEFAULT_URL,
    sha256: str | None = NAMES_SHA256,
    dest: str | os.PathLike[str] | None = None,
    timeout: float = 30,
) -> Path:
    """Download ``url`` to ``dest`` (default ``cache_dir()/"names.txt"``) and return ``dest``.

    The bytes go to a temporary file next to ``dest``, are checked against ``sha256`` (skip the
    check with ``sha256=None``) and are then moved into place with ``os.replace``, so ``dest``
    is either absent, the old file, or complete and verified.  On any failure the temporary file
    is removed and :class:`DataError` is raised.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     src = Path(tmp, "src.txt")
    ...     _ = src.write_bytes(b"emma\\nolivia\\n")
    ...     digest = hashlib.sha256(src.read_bytes()).hexdigest()
    ...     out = download_names(src.as_uri(), digest, dest=Path(tmp, "cache", "names.txt"))
    ...     print(out.name, out.read_text().split())
    names.txt ['emma', 'olivia']
    """
    dest_path = Path(dest) if dest is not None else cache_dir() / "names.txt"
    expected = None if sha256 is None else sha256.strip().lower()

    def fetch_and_check(out: BinaryIO) -> None:
        got = _fetch(url, out, timeout)
        if expected is not None and got != expected:
            raise DataError(
                f"{url}: sha256 mismatch (expected {expected}, got {got}); "
                "refusing to use the download"
            )

    try:
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        fileio.write_atomic(dest_path, fetch_and_check)
    except OSError as e:
        raise DataError(f"{dest_path}: cannot write the download ({_one_line(e)})") from e
    return dest_path


def _fetch(url: str, out: BinaryIO, timeout: float) -> str:
    """Stream ``url`` into the binary file ``out``; return the sha256 hex digest."""

    def failed(e: BaseException) -> DataError:
        return DataError(f"{url}: download failed ({_one_line(e)}); {_HOW_TO_PASS}")

    h = hashlib.sha256()
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)
    except (*_NETWORK_ERRORS, ValueError) as e:  # ValueError: unknown URL type
        raise failed(e) from e
    with resp:
        while True:
            try:
                chunk = resp.read(1 << 16)
            except _NETWORK_ERRORS as e:
                raise failed(e) from e
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
            out.write(chunk)


def resolve_data_path(
    path: str | os.PathLike[str] | None = None,
    *,
    url: str = DEFAULT_URL,
    sha256: str | None = NAMES_SHA256,
) -> Path:
    """Pick the data file: ``path`` if given; else ``$JAXNINJA_DATA`` if set (and non-empty);
    else ``cache_dir()/"names.txt"`` if it exists and matches ``sha256`` (re-downloaded if it
    does not); else download ``url`` there.  Explicit and ``$JAXNINJA_DATA`` paths are returned
    as they are, unchecked (:func:`load_words` reports problems with them).

    >>> print(resolve_data_path("my_names.txt"))
    my_names.txt
    """
    if path is not None:
        return Path(path)
    env = _env("JAXNINJA_DATA")
    if env is not None:
        return Path(env)
    cached = cache_dir() / "names.txt"
    if cached.is_file():
        try:
            ok = sha256 is None or _sha256_file(cached) == sha256.strip().lower()
        except OSError:
            ok = False
        if ok:
            return cached
    return download_names(url, sha256, dest=cached)


def load_words(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Read one word per line from the data file chosen by :func:`resolve_data_path`.

    The file must be UTF-8 (a leading BOM is ignored).  Lines may end in LF, CRLF or CR;
    surrounding whitespace is stripped and blank lines are dropped.  Words are otherwise kept
    as they are: upper-case and non-ASCII letters, and whitespace inside a word, simply become
    part of the vocabulary.  A word containing '.' is refused because '.' is the terminator.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = Path(tmp, "names.txt")
    ...     _ = p.write_bytes(b"emma\\r\\n  Zoe \\r\\n\\r\\nolivia\\n\\n")
    ...     load_words(p)
    ['emma', 'Zoe', 'olivia']
    """
    p = resolve_data_path(path)
    if p.is_dir():
        raise DataError(f"{p}: not a file (it is a directory)")
    try:
        data = p.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{p}: no such file") from e
    except OSError as e:
        raise DataError(f"{p}: cannot read ({_one_line(e.strerror or e)})") from e
    if not data:
        raise DataError(f"{p}: file is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(_split_lines(data[: e.start].decode("utf-8")))
        raise DataError(f"{p}: line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x})") from e
    words = []
    for lineno, raw in enumerate(_split_lines(text), start=1):
        word = raw.strip()
        if not word:
            continue
        if "." in word:
            raise DataError(
                f"{p}: line {lineno}: word {word!r} contains '.', "
                "which is reserved as the start/end token"
            )
        words.append(word)
    if not words:
        raise DataError(f"{p}: file has no words (only blank lines)")
    return words


def _split_lines(text: str) -> list[str]:
    """Universal-newline split (LF, CRLF, CR) that keeps line numbers honest."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


@dataclass(frozen=True)
class Vocab:
    """Characters <-> integer ids.  ``itos[0]`` is always '.', the start/end token.

    ``stoi`` is a read-only mapping built once.  Invalid ``itos`` raise ``ValueError``.

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
        itos = self.itos
        if isinstance(itos, str) or not isinstance(itos, Iterable):
            raise ValueError(f"vocabulary must be a sequence of characters, got {itos!r}")
        itos = tuple(itos)
        if not itos or itos[0] != ".":
            raise ValueError(f"vocabulary must start with '.', got {itos[:1]!r}")
        for i, s in enumerate(itos):
            if not isinstance(s, str) or len(s) != 1:
                raise ValueError(f"vocabulary entry {i} must be a single character, got {s!r}")
        stoi = {s: i for i, s in enumerate(itos)}
        if len(stoi) != len(itos):
            dups = sorted({s for s in itos if itos.count(s) > 1})
            raise ValueError(f"vocabulary has duplicate entries: {dups!r}")
        object.__setattr__(self, "itos", itos)
        object.__setattr__(self, "_stoi", stoi)

    @property
    def stoi(self) -> Mapping[str, int]:
        """Character -> id (a read-only view of a dict built once).

        >>> Vocab(('.', 'a')).stoi['a']
        1
        """
        return MappingProxyType(self._stoi)

    @property
    def size(self) -> int:
        """Number of symbols, '.' included.

        >>> Vocab(('.', 'a', 'b')).size
        3
        """
        return len(self.itos)

    @classmethod
    def from_words(cls, words: Iterable[str]) -> Vocab:
        """'.' is id 0; the sorted set of characters in ``words`` gets ids 1..N.

        >>> Vocab.from_words(["bob", "ada"]).itos
        ('.', 'a', 'b', 'd', 'o')
        """
        if isinstance(words, str):
            raise TypeError("from_words expects a list of words, not a single string")
        chars = sorted(set("".join(words)))
        if "." in chars:
            raise ValueError("words must not contain '.', the start/end token")
        return cls(tuple([".", *chars]))

    def encode(self, s: str) -> list[int]:
        """Ids of the characters of ``s``; an unknown character raises :class:`UnknownCharError`.

        >>> Vocab.from_words(["ab"]).encode("ba")
        [2, 1]
        """
        stoi = self._stoi
        try:
            return [stoi[c] for c in s]
        except KeyError:
            bad = next(c for c in s if c not in stoi)
            raise _unknown_char(bad) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The string for ``ids`` (id 0 decodes to '.'); out-of-range ids raise ``ValueError``.

        >>> Vocab.from_words(["ab"]).decode([1, 2, 0])
        'ab.'
        """
        n = len(self.itos)
        out = []
        for i in ids:
            j = operator.index(i)
            if not 0 <= j < n:
                raise ValueError(f"id {j} is out of range for a vocabulary of size {n}")
            out.append(self.itos[j])
        return "".join(out)

    def to_json(self) -> str:
        """A JSON list of the symbols, for checkpoints.

        >>> Vocab(('.', 'a')).to_json()
        '[".", "a"]'
        """
        return json.dumps(list(self.itos))

    @classmethod
    def from_json(cls, text: str | bytes) -> Vocab:
        """Inverse of :meth:`to_json`; validates and raises ``ValueError`` on bad input.

        >>> Vocab.from_json('[".", "a", "b"]').size
        3
        """
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
    """Lecture examples: int32 ``X`` of shape (N, block_size) and ``Y`` of shape (N,).

    For each word the context starts as ``[0] * block_size``; for each character of
    ``word + '.'`` the pair (context, id) is emitted and the context slides left by one.

    >>> v = Vocab.from_words(["emma"])
    >>> X, Y = build_dataset(["emma"], v, block_size=2)
    >>> X.tolist(), Y.tolist()
    ([[0, 0], [0, 2], [2, 3], [3, 3], [3, 1]], [2, 3, 3, 1, 0])
    """
    if isinstance(words, str):
        raise TypeError("build_dataset expects a list of words, not a single string")
    bs = operator.index(block_size)
    if bs < 1:
        raise ValueError(f"block_size must be >= 1, got {bs}")
    words = list(words)
    for w in words:
        if "." in w:
            raise ValueError(f"word {w!r} contains '.', the start/end token")
    if not words:
        return np.zeros((0, bs), np.int32), np.zeros((0,), np.int32)

    # One flat stream: for each word, bs pads + its characters + the terminator ('.' is id 0).
    pad = "." * bs
    stream = "".join(pad + w + "." for w in words)
    ids = _encode_array(stream, vocab)
    lengths = np.fromiter((len(w) for w in words), np.int64, len(words))
    seg = lengths + bs + 1  # segment length of each word in the stream
    n_ex = lengths + 1  # examples per word
    seg_start = np.cumsum(seg) - seg
    ex_start = np.cumsum(n_ex) - n_ex
    total = int(n_ex.sum())
    # Example k of word w has its context at stream[seg_start[w] + k : ... + bs].
    starts = np.repeat(seg_start - ex_start, n_ex) + np.arange(total)
    X = ids[starts[:, None] + np.arange(bs)]
    Y = ids[starts + bs]
    return X, Y


def _encode_array(s: str, vocab: Vocab) -> np.ndarray:
    """Vectorised ``vocab.encode`` returning int32 (via code points and a sorted lookup)."""
    cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in vocab.itos], dtype=np.uint32)
    order = np.argsort(table, kind="stable")
    sorted_table = table[order]
    pos = np.minimum(np.searchsorted(sorted_table, cps), len(table) - 1)
    bad = sorted_table[pos] != cps
    if bad.any():
        raise _unknown_char(chr(int(cps[int(np.argmax(bad))])))
    return order[pos].astype(np.int32)


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
    if len(fr) != 3 or not all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f >= 0
        for f in fr
    ):
        raise ValueError(f"fractions must be 3 non-negative numbers, got {fractions!r}")
    if abs(math.fsum(fr) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {math.fsum(fr)})")
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    n1 = int(fr[0] * n)
    n2 = min(n, int((fr[0] + fr[1]) * n))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


class Splits(NamedTuple):
    """Result of :func:`load_splits`; unpacks as ``vocab, data``.

    >>> s = Splits(Vocab(('.',)), {"train": (np.zeros((0, 3)), np.zeros(0))})
    >>> vocab, data = s
    >>> s.train[0].shape
    (0, 3)
    """

    vocab: Vocab
    data: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, Y)`` of the training split."""
        return self.data["train"]

    @property
    def val(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, Y)`` of the validation split."""
        return self.data["val"]

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, Y)`` of the test split."""
        return self.data["test"]


def load_splits(
    path: str | os.PathLike[str] | None = None, block_size: int = 3, seed: int = 42
) -> Splits:
    """Words -> vocabulary (from *all* words) -> lecture split -> examples for each split.

    On names.txt this gives 182,625 / 22,655 / 22,866 train/val/test examples.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = Path(tmp, "names.txt")
    ...     _ = p.write_text("\\n".join(["emma", "ava", "bob", "ada"] * 5))
    ...     vocab, data = load_splits(p)
    >>> vocab.size, {k: len(y) for k, (x, y) in data.items()}
    (8, {'train': 67, 'val': 9, 'test': 9})
    """
    words = load_words(path)
    vocab = Vocab.from_words(words)
    parts = split_words(words, seed=seed)
    names = ("train", "val", "test")
    return Splits(
        vocab, {k: build_dataset(ws, vocab, block_size) for k, ws in zip(names, parts, strict=True)}
    )
