"""Bad inputs give errors that name the problem, and leave no output that looks valid."""

import json
import shutil

import pytest

from data_tools.corpus import build_corpus
from data_tools.preprocess import preprocess
from data_tools.sources import resolve_source
from megatron_memorizing.data import (
    CorruptDatasetError,
    DataError,
    DocumentStream,
    IncompatibleError,
    TokenizerError,
    check_compatible,
    load_tokenizer,
)

from fixtures.data_corpus import build_small_data


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return build_small_data(tmp_path_factory.getbasetemp() / "small_data")


@pytest.fixture
def copy(data, tmp_path):
    """A private copy of the test split's dataset (bin, idx, manifest, tokenizer)."""
    for name in ["test.bin", "test.idx", "test.json", "tokenizer.model"]:
        shutil.copy(data.out / name, tmp_path / name)
    return tmp_path / "test"


def leftovers(directory, stem):
    return sorted(p.name for p in directory.iterdir() if stem in p.name)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_truncated_files_are_named(copy, suffix):
    path = copy.with_suffix(suffix)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptDatasetError, match=f"{path.name} is .* truncated"):
        DocumentStream(copy, 2, 64)
    with pytest.raises(CorruptDatasetError):
        check_compatible(copy, 1000)


def test_garbage_index_and_missing_bin(copy):
    copy.with_suffix(".idx").write_bytes(b"not an index at all, but long enough to hold a header")
    with pytest.raises(CorruptDatasetError, match="bad header"):
        DocumentStream(copy, 2, 64)
    copy.with_suffix(".bin").unlink()
    with pytest.raises(CorruptDatasetError, match=r"test.bin does not exist"):
        DocumentStream(copy, 2, 64)


def test_missing_or_unreadable_tokenizer(copy, tmp_path):
    with pytest.raises(TokenizerError, match="not found: train one"):
        load_tokenizer(tmp_path / "nowhere.model")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(IncompatibleError, match="tokenizer stored with .* is missing"):
        check_compatible(copy, 1000)


def test_tokenizer_and_vocab_mismatch(copy, data, tmp_path):
    assert check_compatible(copy, 1000, data.tokenizer).vocab_size == 1000
    with pytest.raises(IncompatibleError, match="embeds only 999 ids"):
        check_compatible(copy, 999)
    from data_tools.train_tokenizer import train_tokenizer

    other = train_tokenizer([data.out / "corpus" / "test.jsonl"], tmp_path / "other.model", vocab_size=500)
    with pytest.raises(IncompatibleError, match="was tokenized with .* but the model uses .*other.model"):
        check_compatible(copy, 1000, other.path)
    shutil.copy(other.path, tmp_path / "tokenizer.model")  # a sibling dataset replaced the shared copy
    with pytest.raises(IncompatibleError, match="not the tokenizer"):
        check_compatible(copy, 1000)


def test_manifest_must_match_the_files(copy, data):
    shutil.copy(data.out / "validation.bin", copy.with_suffix(".bin"))
    shutil.copy(data.out / "validation.idx", copy.with_suffix(".idx"))
    with pytest.raises(IncompatibleError, match="replaced after the manifest"):
        check_compatible(copy, 1000)
    copy.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        check_compatible(copy, 1000)


def test_bytes_overwritten_in_place_are_found_by_checksum(copy, capsys):
    from data_tools.cli import main as data_main

    assert data_main(["check", str(copy)]) == 0
    capsys.readouterr()
    binary = copy.with_suffix(".bin")
    size = binary.stat().st_size
    with open(binary, "r+b") as f:  # random bytes, size unchanged
        f.seek(size // 2)
        f.write(bytes(range(256)) * 4)
    assert binary.stat().st_size == size
    with pytest.raises(CorruptDatasetError, match=r"test.bin is corrupt: its sha256 differs"):
        check_compatible(copy, 1000)
    assert data_main(["check", str(copy)]) != 0
    assert "test.bin is corrupt" in capsys.readouterr().err


def test_a_mistyped_dataset_path_names_the_slip(copy, tmp_path):
    with pytest.raises(DataError, match=r"test.bin ends in .bin: .* without the extension; use .*test$"):
        check_compatible(copy.with_suffix(".bin"), 1000)
    with pytest.raises(DataError, match=r"no dataset at .*tset \(no tset.bin/.idx/.json; datasets there: test\)"):
        check_compatible(copy.with_name("tset"), 1000)
    with pytest.raises(DataError, match=r"no dataset at .*nowhere/test .*nowhere does not exist"):
        check_compatible(tmp_path / "nowhere" / "test", 1000)


def test_empty_corpus(tmp_path, data):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="empty corpus"):
        build_corpus(resolve_source("stdlib", [tmp_path / "src"]), tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists() or not any((tmp_path / "corpus").iterdir())
    (tmp_path / "empty.jsonl").write_text(json.dumps({"id": "x", "text": ""}) + "\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        preprocess(tmp_path / "empty.jsonl", data.tokenizer, tmp_path / "out" / "train")
    assert leftovers(tmp_path / "out", "train") == []


@pytest.mark.parametrize("workers", [1, 2])
def test_invalid_utf8_line_fails_and_leaves_nothing(tmp_path, data, workers):
    good = (data.out / "corpus" / "validation.jsonl").read_bytes()
    bad = b'{"id": "bad", "text": "caf\xe9"}\n'
    lines = good.count(b"\n")
    (tmp_path / "in.jsonl").write_bytes(good + bad + good)
    with pytest.raises(DataError, match=rf"in.jsonl line {lines + 1}: invalid UTF-8"):
        preprocess(tmp_path / "in.jsonl", data.tokenizer, tmp_path / "out" / "train", workers=workers)
    assert leftovers(tmp_path / "out", "train") == []  # no .bin/.idx/.json, no temporary files
    (tmp_path / "in.jsonl").write_bytes(good + b'{"id": "s", "text": "\\ud800"}\n')  # lone surrogate
    with pytest.raises(DataError, match="invalid UTF-8"):
        preprocess(tmp_path / "in.jsonl", data.tokenizer, tmp_path / "out" / "train", workers=workers)
    (tmp_path / "in.jsonl").write_bytes(good + b'{"id": "s", "body": "no text"}\n')
    with pytest.raises(DataError, match='"text" string'):
        preprocess(tmp_path / "in.jsonl", data.tokenizer, tmp_path / "out" / "train", workers=workers)


def test_failed_rewrite_keeps_no_stale_manifest(tmp_path, data):
    jsonl = data.out / "corpus" / "test.jsonl"
    prefix = tmp_path / "test"
    preprocess(jsonl, data.tokenizer, prefix)
    with pytest.raises(DataError, match="--force"):
        preprocess(jsonl, data.tokenizer, prefix)
    (tmp_path / "bad.jsonl").write_bytes(b"{not json\n")
    with pytest.raises(DataError, match="bad.jsonl line 1"):
        preprocess(tmp_path / "bad.jsonl", data.tokenizer, prefix, force=True)
    # The old .bin/.idx remain, but without a manifest nothing accepts them as a finished dataset.
    with pytest.raises(DataError, match="no manifest"):
        check_compatible(prefix, 1000)


def test_non_utf8_source_file_is_skipped_and_reported(tmp_path, data):
    src = tmp_path / "src"
    shutil.copytree(data.source / "json", src)
    (src / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1") + b"x = 1\n" * 100)
    stats = build_corpus(resolve_source("stdlib", [src]), tmp_path / "corpus", 0.0, 0.0)
    assert stats["skipped"]["not UTF-8"] == 1
    assert "latin1.py: byte 5" in stats["skipped_examples"]["not UTF-8"]


def test_bad_stream_arguments(data):
    with pytest.raises(DataError, match="dp_rank 2 is outside"):
        DocumentStream(data.prefix("train"), 2, 64, dp_rank=2, dp_size=2)
    with pytest.raises(DataError, match="must be >= 1"):
        DocumentStream(data.prefix("train"), 0, 64)
