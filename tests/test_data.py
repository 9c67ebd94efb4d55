"""Tests for jaxninja.lecture.data: the packaged file, loading, vocabulary, examples and splits,
every kind of hostile data path or content."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import pickle
import random
import socket
import threading
import tracemalloc
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxninja.errors import JaxninjaError
from jaxninja.lecture import data
from jaxninja.lecture.data import (
    DataError,
    UnknownCharError,
    Vocab,
    build_dataset,
    is_control,
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
    res = load_splits(names_file)
    vocab, splits = res.vocab, res.data
    assert vocab.size == 27
    assert res.sha256 == data.NAMES_SHA256
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
    parts = (res.data["train"], res.data["val"], res.data["test"])
    for (x, y), ws in zip(parts, lecture_split(names), strict=True):
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


# --------------------------------------------------------------------------- the packaged file


def test_packaged_names_is_byte_identical_to_the_reference(names_file: Path) -> None:
    packaged = resources.files("jaxninja").joinpath("names.txt").read_bytes()
    assert hashlib.sha256(packaged).hexdigest() == data.NAMES_SHA256
    assert packaged == names_file.read_bytes()


def test_names_txt_is_declared_package_data() -> None:
    """The wheel carries it: pyproject's package-data names it, .gitignore lets it in."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    assert "names.txt" in pyproject["tool"]["setuptools"]["package-data"]["jaxninja"]
    assert "!jaxninja/names.txt" in (repo / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("env", [None, ""])
def test_default_is_the_packaged_file(env, monkeypatch: pytest.MonkeyPatch) -> None:
    """No path and no (or an empty) $JAXNINJA_DATA: the copy inside the package, offline."""
    if env is None:
        monkeypatch.delenv("JAXNINJA_DATA", raising=False)
    else:
        monkeypatch.setenv("JAXNINJA_DATA", env)
    p = resolve_data_path()
    assert p == Path(data.__file__).parents[1] / "names.txt"
    assert len(load_words()) == 32033
    assert load_splits().sha256 == data.NAMES_SHA256


def test_resolve_explicit_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXNINJA_DATA", str(tmp_path / "env.txt"))
    assert resolve_data_path(tmp_path / "explicit.txt") == tmp_path / "explicit.txt"
    assert resolve_data_path("rel.txt") == Path("rel.txt")
    assert resolve_data_path() == tmp_path / "env.txt"


# --------------------------------------------------------------------------- Splits


def test_splits_are_read_by_attribute(tmp_path: Path) -> None:
    p = tmp_path / "w.txt"
    p.write_bytes(b"emma\nava\nbob\nada\nzoe\n" * 4)
    s = load_splits(p)
    assert s._fields == ("vocab", "data", "sha256")
    assert not any(hasattr(s, k) for k in ("train", "val", "test"))
    assert s.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert sorted(s.data) == ["test", "train", "val"]


def test_sha256_tells_files_with_the_same_characters_apart(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("emma\nava\nbob\nada\nzoe\n" * 4)
    b.write_text("ava\nemma\nbob\nada\nzoe\n" * 4)
    sa, sb = load_splits(a), load_splits(b)
    assert sa.vocab == sb.vocab and sa.sha256 != sb.sha256


def test_too_small_for_a_training_split(tmp_path: Path) -> None:
    p = tmp_path / "one.txt"
    p.write_text("emma\n")
    with pytest.raises(DataError) as exc:
        load_splits(p)
    assert str(exc.value) == f"{p}: the training split is empty (the file needs more words)"
    p.write_text("emma\nolivia\nava\n")  # val empty, train and test not: allowed
    parts = split_words(["emma", "olivia", "ava"])
    assert [len(p) for p in parts] == [2, 0, 1]
    expected = [sum(len(w) + 1 for w in part) for part in parts]
    assert [len(y) for _, y in load_splits(p).data.values()] == expected


def test_data_error_is_the_tool_s_error() -> None:

    assert issubclass(DataError, JaxninjaError) and issubclass(DataError, ValueError)


# --------------------------------------------------------------------------- path kinds


def _load_with_timeout(p: Path, seconds: float = 20) -> BaseException | list[str]:
    """``load_words(p)`` in a thread: a hang fails the test instead of blocking the suite."""
    box: list = []

    def target() -> None:
        try:
            box.append(load_words(p))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"load_words({p}) hung"
    return box[0]


def _message(result: BaseException | list[str]) -> str:
    assert isinstance(result, DataError), result
    msg = str(result)
    assert "\n" not in msg
    return msg


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    assert _message(_load_with_timeout(p)) == f"{p}: not a file (it is a FIFO)"


def test_dev_zero_is_refused_without_reading() -> None:
    p = Path("/dev/zero")
    assert _message(_load_with_timeout(p)) == f"{p}: not a file (it is a character device)"


def test_socket_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(p))
        msg = _message(_load_with_timeout(p))
    assert msg.startswith(f"{p}: ") and ("socket" in msg or "cannot read" in msg), msg


def test_symlinks(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("emma\nava\n")
    (tmp_path / "link").symlink_to(good)
    assert load_words(tmp_path / "link") == ["emma", "ava"]
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    msg = _message(_load_with_timeout(tmp_path / "a"))
    assert msg == f"{tmp_path / 'a'}: cannot read (Too many levels of symbolic links)"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert _message(_load_with_timeout(tmp_path / "dangling")).endswith(": no such file")


def test_path_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("emma\n")
    assert str(_load_with_timeout(f / "x")) == f"{f / 'x'}: cannot read (Not a directory)"


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "secret.txt"
    p.write_text("emma\n")
    p.chmod(0)
    if os.access(p, os.R_OK):  # root reads anything: make the kernel's refusal ourselves
        real_open = os.open

        def deny(path, *args, **kwargs):
            if Path(path) == p:
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", deny)
    with pytest.raises(DataError) as exc:
        load_words(p)
    assert str(exc.value) == f"{p}: cannot read (Permission denied)"


def test_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.MAX_BYTES == 1 << 30  # the real cap is 1 GiB; a small one is tested below
    monkeypatch.setattr(data, "MAX_BYTES", 10)
    p = tmp_path / "big.txt"
    p.write_bytes(b"emma\nava\n\n")  # exactly 10 bytes: fine
    assert load_words(p) == ["emma", "ava"]
    p.write_bytes(b"emma\nava\n\n\n")
    with pytest.raises(DataError) as exc:
        load_words(p)
    assert str(exc.value) == f"{p}: file is over 10 bytes, too big for a word list"


# --------------------------------------------------------------------------- control characters

CONTROLS = [
    "\x00",
    "\x1b",
    "\x07",
    "\x7f",
    "\x85",
    "\u200b",
    "\u202e",
    "\u2028",
    "\ufeff",
]


@pytest.mark.parametrize("ch", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_control_characters_are_refused_with_file_and_line(tmp_path: Path, ch: str) -> None:
    p = tmp_path / "names.txt"
    p.write_bytes(f"emma\nava\nol{ch}ivia\nbob\n".encode())
    with pytest.raises(DataError) as exc:
        load_words(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}: line 3: word ") and f"U+{ord(ch):04X}" in msg
    assert not any(is_control(c) for c in msg), "the message must not carry the character"
    with pytest.raises(DataError):
        load_splits(p)
    with pytest.raises(ValueError, match=f"control character U\\+{ord(ch):04X}"):
        Vocab((".", "a", ch))


def test_esc_sequence_never_reaches_the_terminal(tmp_path: Path) -> None:
    p = tmp_path / "ansi.txt"
    p.write_bytes(b"emma\n\x1b[2J\x1b[31mred\n")
    with pytest.raises(DataError) as exc:
        load_words(p)
    assert (
        str(exc.value)
        == f"{p}: line 2: word '\\x1b[2J\\x1b[31mred' contains the control character U+001B"
    )


def test_long_words_are_shortened_in_messages(tmp_path: Path) -> None:
    p = tmp_path / "long.txt"
    p.write_text("a" * 10_000 + ".b\n")
    with pytest.raises(DataError) as exc:
        load_words(p)
    assert len(str(exc.value)) < len(str(p)) + 150


def test_stripped_whitespace_controls_are_fine(tmp_path: Path) -> None:
    """Tabs, form feeds and the like around a word are whitespace, not part of it."""
    p = tmp_path / "ws.txt"
    p.write_bytes(b"\temma\x0c\n\x0bava \x1c\n")
    assert load_words(p) == ["emma", "ava"]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(alphabet="ab\x00\x1b\t\u200d \u00e9\r\n", max_size=6), max_size=8))
def test_no_control_character_reaches_the_vocabulary(tmp_path_factory, lines) -> None:
    p = tmp_path_factory.mktemp("h") / "w.txt"
    p.write_bytes("\n".join(lines).encode())
    try:
        words = load_words(p)
    except DataError as e:
        assert str(e).startswith(f"{p}: ") and not any(is_control(c) for c in str(e))
        return
    assert all(not is_control(c) for w in words for c in w)
    assert all(not is_control(c) for c in Vocab.from_words(words).itos)


def test_zero_width_joiners_of_ordinary_names_are_kept(tmp_path: Path) -> None:
    """U+200C (zero-width non-joiner) is part of ordinary Persian spelling (U+200D, the
    joiner, of Indic scripts): a format character, but never refused."""
    p = tmp_path / "fa.txt"
    p.write_text("emma\nمی\u200cخواهم\nश्\u200dर\n")
    words = load_words(p)
    assert words[1] == "می\u200cخواهم" and "\u200d" in words[2]
    assert "\u200c" in Vocab.from_words(words).itos


# --------------------------------------------------------------------------- memory to build


@pytest.mark.parametrize("block_size", [3, 16])
def test_build_memory_estimate_bounds_the_measured_peak(block_size: int) -> None:
    """data.BUILD_BYTES (the figure the size check uses) is at least build_dataset's
    measured peak per example, and not a gross over-estimate."""
    words = load_words()[:5000]
    vocab = Vocab.from_words(words)
    n = sum(len(w) + 1 for w in words)
    tracemalloc.start()
    try:
        build_dataset(words, vocab, block_size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = n * (data.BUILD_BYTES[0] + data.BUILD_BYTES[1] * block_size)
    print(f"block_size {block_size}: peak {peak / n:.1f} B/example, estimate {estimate / n}")
    assert peak <= estimate <= 1.1 * peak


def test_examples_that_cannot_fit_are_refused_before_they_are_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "w.txt"
    p.write_text("emma\nava\nolivia\nisabella\nsophia\n" * 4)  # 140 examples
    n = 4 * (5 + 4 + 7 + 9 + 7)
    monkeypatch.setattr(
        data, "physical_memory", lambda: 10 * n * (data.BUILD_BYTES[0] + data.BUILD_BYTES[1] * 50)
    )
    assert load_splits(p, block_size=50).data["train"][0].shape[1] == 50  # 8% of it: fine

    def never(*args, **kwargs):
        raise AssertionError("built before the check")

    monkeypatch.setattr(data, "build_dataset", never)
    with pytest.raises(DataError) as exc:
        load_splits(p, block_size=5000)
    assert str(exc.value).startswith(f"{p}: building its {n} examples with --block-size 5000 ")
    assert str(exc.value).endswith("use a smaller data file or --block-size")
