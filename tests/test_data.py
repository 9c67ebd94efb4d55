"""Tests for jaxninja.data: loading, vocabulary, examples, splits and the download path."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import http.server
import pickle
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxninja import data
from jaxninja.data import (
    DataError,
    UnknownCharError,
    Vocab,
    build_dataset,
    cache_dir,
    download_names,
    load_splits,
    load_words,
    resolve_data_path,
    split_words,
)


@pytest.fixture(scope="module")
def names(names_file: Path) -> list[str]:
    return load_words(names_file)


def reference_dataset(words: list[str], vocab: Vocab, block_size: int):
    """The lecture's loop, verbatim."""
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = vocab.stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return np.array(X, dtype=np.int32).reshape(-1, block_size), np.array(Y, dtype=np.int32)


# --------------------------------------------------------------------------- names.txt


def test_names_file_is_the_real_one(names_file: Path) -> None:
    assert hashlib.sha256(names_file.read_bytes()).hexdigest() == data.NAMES_SHA256


def test_names_words_and_vocab(names: list[str]) -> None:
    assert len(names) == 32033
    assert names[:3] == ["emma", "olivia", "ava"]
    v = Vocab.from_words(names)
    assert v.size == 27
    assert v.itos[0] == "." and v.itos[1] == "a" and v.itos[26] == "z"
    assert "".join(v.itos) == ".abcdefghijklmnopqrstuvwxyz"
    assert v.stoi["."] == 0 and v.stoi["a"] == 1 and v.stoi["z"] == 26


def test_load_splits_counts(names_file: Path) -> None:
    vocab, splits = load_splits(names_file)
    assert vocab.size == 27
    assert {k: len(y) for k, (x, y) in splits.items()} == {
        "train": 182625,
        "val": 22655,
        "test": 22866,
    }
    for x, y in splits.values():
        assert x.dtype == np.int32 and y.dtype == np.int32
        assert x.shape == (len(y), 3)
        assert x.min() >= 0 and x.max() < 27 and y.min() >= 0 and y.max() < 27


def lecture_split(words: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The lecture's split, literally: ``random.seed(42); random.shuffle(words)`` then
    80/10/10 (on a copy; the global random state is restored afterwards)."""
    shuffled = list(words)
    state = random.getstate()
    try:
        random.seed(42)
        random.shuffle(shuffled)
    finally:
        random.setstate(state)
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


def test_load_splits_matches_lecture(names: list[str], names_file: Path) -> None:
    vocab = Vocab.from_words(names)
    res = load_splits(names_file, block_size=4)
    assert res.vocab == vocab
    for (x, y), ws in zip((res.train, res.val, res.test), lecture_split(names), strict=True):
        rx, ry = reference_dataset(ws, vocab, 4)
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


def test_build_dataset_all_names_matches_reference(names: list[str]) -> None:
    vocab = Vocab.from_words(names)
    x, y = build_dataset(names, vocab, 3)
    rx, ry = reference_dataset(names, vocab, 3)
    assert x.shape == (228146, 3)
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)


# --------------------------------------------------------------------------- build_dataset

ALPHABET = ".abcdefghijklmnopqrstuvwxyz"


@pytest.mark.parametrize(
    ("block_size", "expected_x", "expected_y"),
    [
        (3, [[0, 0, 0], [0, 0, 5], [0, 5, 13], [5, 13, 13], [13, 13, 1]], [5, 13, 13, 1, 0]),
        (1, [[0], [5], [13], [13], [1]], [5, 13, 13, 1, 0]),
        (
            5,
            [
                [0, 0, 0, 0, 0],
                [0, 0, 0, 0, 5],
                [0, 0, 0, 5, 13],
                [0, 0, 5, 13, 13],
                [0, 5, 13, 13, 1],
            ],
            [5, 13, 13, 1, 0],
        ),
    ],
)
def test_build_dataset_emma(block_size: int, expected_x, expected_y) -> None:
    vocab = Vocab(tuple(ALPHABET))
    x, y = build_dataset(["emma"], vocab, block_size)
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert x.tolist() == expected_x
    assert y.tolist() == expected_y
    contexts = [("." * block_size + "emma")[i : i + block_size] for i in range(5)]
    assert [vocab.decode(row) for row in x] == contexts


def test_build_dataset_several_words() -> None:
    vocab = Vocab(tuple(ALPHABET))
    x, y = build_dataset(["ab", "c", ""], vocab, 2)
    assert x.tolist() == [[0, 0], [0, 1], [1, 2], [0, 0], [0, 3], [0, 0]]
    assert y.tolist() == [1, 2, 0, 3, 0, 0]


@pytest.mark.parametrize("block_size", [1, 3, 8])
def test_build_dataset_empty(block_size: int) -> None:
    x, y = build_dataset([], Vocab(tuple(ALPHABET)), block_size)
    assert x.shape == (0, block_size) and y.shape == (0,)
    assert x.dtype == np.int32 and y.dtype == np.int32


@pytest.mark.parametrize("block_size", [0, -1, -5])
def test_build_dataset_bad_block_size(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        build_dataset(["emma"], Vocab(tuple(ALPHABET)), block_size)


def test_build_dataset_rejects_bad_words() -> None:
    vocab = Vocab(tuple(ALPHABET))
    with pytest.raises(ValueError, match=r"'\.'"):
        build_dataset(["em.ma"], vocab)
    with pytest.raises(UnknownCharError, match=r"'Z' \(U\+005A\)"):
        build_dataset(["emma", "Zoe"], vocab)
    with pytest.raises(TypeError):
        build_dataset("emma", vocab)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.text(alphabet="abcXyzé ñ💡", max_size=8), max_size=12),
    block_size=st.integers(1, 6),
)
def test_build_dataset_matches_lecture_loop(words: list[str], block_size: int) -> None:
    vocab = Vocab.from_words(words)
    x, y = build_dataset(words, vocab, block_size)
    rx, ry = reference_dataset(words, vocab, block_size)
    assert x.shape == (sum(len(w) + 1 for w in words), block_size)
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)


# --------------------------------------------------------------------------- split_words


def test_split_words_equals_global_random_version_and_is_pure(names: list[str]) -> None:
    original = list(names)
    state_before = random.getstate()
    tr, va, te = split_words(names)
    assert random.getstate() == state_before  # global RNG untouched
    assert names == original  # input not mutated

    assert (tr, va, te) == lecture_split(names)
    assert random.getstate() == state_before
    assert (len(tr), len(va), len(te)) == (25626, 3203, 3204)


@pytest.mark.parametrize("seed", [0, 1, 42, 1234])
@pytest.mark.parametrize("n", [0, 1, 2, 9, 10, 11, 99, 1000, 32033])
def test_split_words_sizes_and_permutation(n: int, seed: int) -> None:
    words = [f"w{i}" for i in range(n)]
    tr, va, te = split_words(words, seed=seed)
    assert (len(tr), len(va)) == (int(0.8 * n), int(0.9 * n) - int(0.8 * n))
    assert sorted(tr + va + te) == sorted(words)
    expected = list(words)
    random.Random(seed).shuffle(expected)
    assert tr + va + te == expected


def test_split_words_custom_fractions() -> None:
    words = [str(i) for i in range(100)]
    assert [len(p) for p in split_words(words, fractions=(0.5, 0.25, 0.25))] == [50, 25, 25]
    assert [len(p) for p in split_words(words, fractions=(1, 0, 0))] == [100, 0, 0]
    assert [len(p) for p in split_words(words, fractions=(0, 0, 1))] == [0, 0, 100]


@pytest.mark.parametrize(
    "fractions",
    [(0.8, 0.1), (0.5, 0.5, 0.5), (0.9, 0.2, -0.1), (0.8, 0.1, 0.1, 0.0), (float("nan"), 0.5, 0.5)],
)
def test_split_words_bad_fractions(fractions) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_words(["a", "b"], fractions=fractions)


# --------------------------------------------------------------------------- load_words


def test_crlf_and_lf_give_same_words(tmp_path: Path) -> None:
    words = ["emma", "olivia", "ava"]
    lf, crlf, cr = tmp_path / "lf.txt", tmp_path / "crlf.txt", tmp_path / "cr.txt"
    lf.write_bytes("\n".join(words).encode() + b"\n")
    crlf.write_bytes("\r\n".join(words).encode() + b"\r\n")
    cr.write_bytes("\r".join(words).encode() + b"\r")
    assert load_words(lf) == load_words(crlf) == load_words(cr) == words


def test_whitespace_and_blank_lines_stripped(tmp_path: Path) -> None:
    p = tmp_path / "names.txt"
    p.write_bytes(b"\n  emma \n\tolivia\t\r\n\n\n   \nava\n\n\n \t \n")
    assert load_words(p) == ["emma", "olivia", "ava"]


def test_utf8_bom_ignored(tmp_path: Path) -> None:
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfemma\nava\n")
    assert load_words(p) == ["emma", "ava"]


def test_internal_whitespace_kept(tmp_path: Path) -> None:
    p = tmp_path / "names.txt"
    p.write_text("mary ann\nbob\n", encoding="utf-8")
    words = load_words(p)
    assert words == ["mary ann", "bob"]
    assert " " in Vocab.from_words(words).stoi


def test_non_ascii_and_mixed_case_round_trip(tmp_path: Path) -> None:
    words = ["Zoë", "Åsa", "josé", "MiKe", "Łukasz", "李"]
    p = tmp_path / "intl.txt"
    p.write_text("\n".join(words) + "\n", encoding="utf-8")
    loaded = load_words(p)
    assert loaded == words
    v = Vocab.from_words(loaded)
    assert v.itos[0] == "."
    assert list(v.itos[1:]) == sorted(set("".join(words)))
    for ch in "ZëÅéMKŁ李":
        assert ch in v.stoi
    for w in loaded:
        assert v.decode(v.encode(w)) == w
    x, y = build_dataset(loaded, v, 3)
    rx, ry = reference_dataset(loaded, v, 3)
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "file is empty"),
        (b"\n\n  \r\n\t\n", "only blank lines"),
        (b"emma\nolivia\nava\nis\xffabella\nsophia\n", "line 4 is not valid UTF-8"),
        (b"\xc3\n", "line 1 is not valid UTF-8"),
        (b"emma\r\n\r\nol\xc3\x28ivia\r\n", "line 3 is not valid UTF-8"),
        (b"emma\nolivia\n\nj.r.\n", "line 4"),
        (b".\n", "line 1"),
    ],
    ids=["empty", "blank", "bad-utf8", "bad-utf8-first", "bad-utf8-crlf", "dot", "only-dot"],
)
def test_bad_files_raise_data_error(tmp_path: Path, content: bytes, expected: str) -> None:
    p = tmp_path / "some_names.txt"
    p.write_bytes(content)
    with pytest.raises(DataError) as exc:
        load_words(p)
    msg = str(exc.value)
    assert str(p) in msg and expected in msg
    assert "\n" not in msg
    assert isinstance(exc.value, ValueError)


def test_dot_word_message(tmp_path: Path) -> None:
    p = tmp_path / "dots.txt"
    p.write_text("emma\nj.r.\n")
    with pytest.raises(DataError, match=r"dots\.txt: line 2: word 'j\.r\.' contains '\.'"):
        load_words(p)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope" / "missing.txt"
    with pytest.raises(DataError) as exc:
        load_words(p)
    assert str(exc.value) == f"{p}: no such file"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_words(tmp_path)
    assert str(exc.value) == f"{tmp_path}: not a file (it is a directory)"


def test_load_words_uses_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "env.txt"
    p.write_text("ann\nbo\n")
    monkeypatch.setenv("JAXNINJA_DATA", str(p))
    assert load_words() == ["ann", "bo"]


# --------------------------------------------------------------------------- Vocab


def test_vocab_basics() -> None:
    v = Vocab.from_words(["emma", "ava"])
    assert v.itos == (".", "a", "e", "m", "v")
    assert dict(v.stoi) == {".": 0, "a": 1, "e": 2, "m": 3, "v": 4}
    assert pickle.loads(pickle.dumps(v)) == v and copy.deepcopy(v).stoi == v.stoi
    assert dataclasses.asdict(v)["itos"] == v.itos
    with pytest.raises(TypeError):
        v.stoi["x"] = 9  # type: ignore[index]
    assert v.size == 5
    assert v.encode("emma") == [2, 3, 3, 1]
    assert v.decode([2, 3, 3, 1, 0]) == "emma."
    assert v.decode(np.array([4, 1], dtype=np.int32)) == "va"
    assert v == Vocab((".", "a", "e", "m", "v")) and hash(v) == hash(Vocab(v.itos))
    assert Vocab.from_words([]).itos == (".",)


@pytest.mark.parametrize("ch", ["Z", "é", "💡", "-"])
def test_encode_unknown_char(ch: str) -> None:
    v = Vocab.from_words(["emma"])
    with pytest.raises(UnknownCharError) as exc:
        v.encode("em" + ch + "ma")
    assert str(exc.value) == f"character {ch!r} (U+{ord(ch):04X}) is not in the vocabulary"
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, ValueError)


@pytest.mark.parametrize("bad", [-1, 5, 100])
def test_decode_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match=f"id {bad} is out of range"):
        Vocab.from_words(["emma", "ava"]).decode([1, bad])


def test_vocab_json_round_trip(names: list[str]) -> None:
    for v in (Vocab.from_words(names), Vocab.from_words(["Zoë", "李 x"])):
        s = v.to_json()
        assert isinstance(s, str)
        assert Vocab.from_json(s) == v
        assert Vocab.from_json(s.encode()) == v
    assert Vocab.from_words(names).to_json().startswith('[".", "a", "b"')


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "not valid JSON"),
        ('{"itos": ["."]}', "must be a list"),
        ("[]", "must start with '.'"),
        ('["a", "."]', "must start with '.'"),
        ('[".", "a", "a"]', "duplicate"),
        ('[".", "a", "."]', "duplicate"),
        ('[".", "ab"]', "single character"),
        ('[".", ""]', "single character"),
        ('[".", 1]', "single character"),
    ],
)
def test_vocab_from_json_validates(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Vocab.from_json(text)


def test_vocab_from_words_rejects_dot() -> None:
    with pytest.raises(ValueError, match=r"'\.'"):
        Vocab.from_words(["a.b"])


# --------------------------------------------------------------------------- cache / download


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXNINJA_CACHE", str(tmp_path / "jx"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "jx"
    monkeypatch.delenv("JAXNINJA_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "jaxninja"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "jaxninja"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "jaxninja"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a temporary directory: (base URL, directory)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("JAXNINJA_CACHE", str(d))
    monkeypatch.delenv("JAXNINJA_DATA", raising=False)
    return d


def dead_url() -> str:
    """A URL on a local port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/names.txt"


CONTENT = b"emma\nolivia\nava\n"
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()


def all_files(d: Path) -> list[Path]:
    return sorted(d.rglob("*")) if d.exists() else []


def test_download_success(http_dir: tuple[str, Path], cache: Path) -> None:
    base, served = http_dir
    (served / "names.txt").write_bytes(CONTENT)
    out = download_names(f"{base}/names.txt", sha256=CONTENT_SHA, timeout=10)
    assert out == cache / "names.txt"
    assert out.read_bytes() == CONTENT
    assert all_files(cache) == [cache / "names.txt"]  # no temp file left over
    assert load_words(out) == ["emma", "olivia", "ava"]


def test_download_overwrites_existing(http_dir: tuple[str, Path], cache: Path) -> None:
    base, served = http_dir
    (served / "names.txt").write_bytes(CONTENT)
    cache.mkdir()
    (cache / "names.txt").write_bytes(b"stale\n")
    download_names(f"{base}/names.txt", sha256=CONTENT_SHA.upper(), timeout=10)
    assert (cache / "names.txt").read_bytes() == CONTENT
    assert all_files(cache) == [cache / "names.txt"]


def test_download_sha_mismatch(http_dir: tuple[str, Path], cache: Path) -> None:
    base, served = http_dir
    (served / "names.txt").write_bytes(b"tampered\n")
    url = f"{base}/names.txt"
    with pytest.raises(DataError) as exc:
        download_names(url, sha256=CONTENT_SHA, timeout=10)
    msg = str(exc.value)
    assert url in msg and CONTENT_SHA in msg
    assert hashlib.sha256(b"tampered\n").hexdigest() in msg
    assert "\n" not in msg
    assert all_files(cache) == []


def test_download_sha_mismatch_keeps_old_file(http_dir: tuple[str, Path], cache: Path) -> None:
    base, served = http_dir
    (served / "names.txt").write_bytes(b"tampered\n")
    cache.mkdir()
    (cache / "names.txt").write_bytes(CONTENT)
    with pytest.raises(DataError, match="sha256"):
        download_names(f"{base}/names.txt", sha256="0" * 64, timeout=10)
    assert all_files(cache) == [cache / "names.txt"]
    assert (cache / "names.txt").read_bytes() == CONTENT


@pytest.mark.parametrize("kind", ["unreachable", "404"])
def test_download_failure(http_dir: tuple[str, Path], cache: Path, kind: str) -> None:
    url = dead_url() if kind == "unreachable" else f"{http_dir[0]}/missing.txt"
    with pytest.raises(DataError) as exc:
        download_names(url, sha256=CONTENT_SHA, timeout=10)
    msg = str(exc.value)
    assert url in msg and "download failed" in msg
    assert "--data PATH" in msg and "JAXNINJA_DATA=PATH" in msg
    assert "\n" not in msg
    assert all_files(cache) == []


def test_resolve_explicit_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXNINJA_DATA", str(tmp_path / "env.txt"))
    assert resolve_data_path(tmp_path / "explicit.txt") == tmp_path / "explicit.txt"
    assert resolve_data_path("rel.txt") == Path("rel.txt")
    assert resolve_data_path() == tmp_path / "env.txt"


def test_resolve_uses_valid_cache_without_network(cache: Path) -> None:
    cache.mkdir()
    (cache / "names.txt").write_bytes(CONTENT)
    # The URL is dead: success proves no download was attempted.
    assert resolve_data_path(url=dead_url(), sha256=CONTENT_SHA) == cache / "names.txt"
    assert load_words(resolve_data_path(url=dead_url(), sha256=CONTENT_SHA)) == [
        "emma",
        "olivia",
        "ava",
    ]


def test_load_words_default_uses_cached_names(names_file: Path, cache: Path) -> None:
    # A verified names.txt in the cache is used as is (no network needed for this test).
    cache.mkdir()
    (cache / "names.txt").write_bytes(names_file.read_bytes())
    assert resolve_data_path() == cache / "names.txt"
    assert len(load_words()) == 32033
    assert all_files(cache) == [cache / "names.txt"]


def test_resolve_redownloads_bad_cache(http_dir: tuple[str, Path], cache: Path) -> None:
    base, served = http_dir
    (served / "names.txt").write_bytes(CONTENT)
    cache.mkdir()
    (cache / "names.txt").write_bytes(b"corrupt\n")
    p = resolve_data_path(url=f"{base}/names.txt", sha256=CONTENT_SHA)
    assert p == cache / "names.txt" and p.read_bytes() == CONTENT
    assert all_files(cache) == [cache / "names.txt"]


def test_resolve_downloads_when_no_cache(http_dir: tuple[str, Path], cache: Path) -> None:
    base, served = http_dir
    (served / "names.txt").write_bytes(CONTENT)
    p = resolve_data_path(url=f"{base}/names.txt", sha256=CONTENT_SHA)
    assert p == cache / "names.txt" and p.read_bytes() == CONTENT


def test_resolve_bad_cache_and_no_network(cache: Path) -> None:
    cache.mkdir()
    (cache / "names.txt").write_bytes(b"corrupt\n")
    with pytest.raises(DataError, match="JAXNINJA_DATA=PATH"):
        resolve_data_path(url=dead_url(), sha256=CONTENT_SHA)
    assert all_files(cache) == [cache / "names.txt"]  # old file untouched, no temp files
