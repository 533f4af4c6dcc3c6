"""GGUF files refused with one line before anything is written: a missing file, a file that is not
GGUF, an architecture outside the Llama family, an output directory that holds something else.
(The conversion itself is checked on a real model in test_pretrained_llama.py.)"""

import subprocess
import sys

import numpy as np
import pytest

from megatron_memorizing.hf.gguf import GGUFError, gguf_to_hf
from megatron_memorizing.hf.importer import main as import_main


def gpt2_gguf(path):
    """A one-layer GPT-2 in GGUF: an architecture transformers reads and this project does not import."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges([])
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bad_source(tmp_path, case):
    if case == "missing":
        return tmp_path / "absent.gguf"
    if case == "not_gguf":
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"\0" * 64)
        return path
    return gpt2_gguf(tmp_path / "gpt2.gguf")


@pytest.mark.parametrize("case,expected", [
    ("missing", "does not exist: pass the path of a .gguf file"),
    ("not_gguf", "is not a GGUF file"),
    ("gpt2", "holds a 'gpt2' model; this project imports the Llama family"),
])
def test_a_file_that_cannot_be_converted_is_refused_and_nothing_is_written(tmp_path, case, expected):
    with pytest.raises(GGUFError, match=expected):
        gguf_to_hf(bad_source(tmp_path, case), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_output_holding_something_else_is_refused_and_kept(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(GGUFError, match="exists and is not a conversion of"):
        gguf_to_hf(gpt2_gguf(tmp_path / "gpt2.gguf"), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_an_unknown_pretrained_model_is_one_line_and_exit_2():
    done = subprocess.run(
        [sys.executable, "-m", "data_tools.cli", "pretrained", "gpt-5"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "invalid choice: 'gpt-5'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("case,expected", [
    ("missing", "absent.gguf does not exist"),
    ("gpt2", "holds a 'gpt2' model"),
])
def test_importing_a_gguf_file_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, capsys, case, expected):
    code = import_main(["--hf-model", str(bad_source(tmp_path, case)), "--output", str(tmp_path / "ckpt")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and expected in error
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))
