"""Every command-line tool refuses a bad argument the same way: one line on stderr naming the
argument and the fix, exit code 2, no traceback, nothing written (docs/reliability.md).

One table, one test: a new argument of any tool joins the table. Each case runs the tool as its
own process, in a fresh folder that holds every path the case names, and a bad argument must be
refused before anything heavy is read: the paths here are missing, empty or dummies.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN = "megatron_memorizing.train"
DATA = "data_tools.cli"
RECALL_TASK = "data_tools.recall_task"
EVAL = "megatron_memorizing.eval.perplexity_cli"
RECALL = "megatron_memorizing.eval.recall"
LOOKUP_HEADS = "megatron_memorizing.eval.lookup_heads"
MEMORY_LOOKUPS = "megatron_memorizing.eval.memory_lookups"
INSPECT = "megatron_memorizing.eval.inspect_retrieval"
COMPARE = "megatron_memorizing.eval.compare"
CURVES = "megatron_memorizing.eval.curves"
EXPORT = "megatron_memorizing.hf.convert"
IMPORT = "megatron_memorizing.hf.importer"

# Placeholders, paths in the case's own folder (its working directory): {file} a file, {folder}
# an empty folder, {missing} nothing at all, {out} where an output would go (nothing there yet),
# {docs} a JSONL file of one document, {config} a copy of configs/tiny-cpu.yaml, {evaluation} a
# folder holding a perplexity.json. The error line must contain the third column (formatted too).
CASES = [
    (TRAIN, "--config {missing}", "--config"),
    (TRAIN, "--config {folder}", "--config"),
    (TRAIN, "--config {config} --set model.memory_sizee=64", "model.memory_sizee"),
    (TRAIN, "--config {config} --set modell.memory_size=64", "modell.memory_size"),
    (TRAIN, "--config {config} --set model.memory_size", "model.memory_size"),
    (TRAIN, "--config {config} --set model.memory_layers=3", "model.memory_layers"),
    (TRAIN, "--config {config} --set model.memory_size=0", "memory_size"),
    (TRAIN, "--config {config} --set model.knn_top_k=-4", "knn_top_k"),
    (TRAIN, "--config {config} --set training.steps=0", "training.steps"),
    (TRAIN, "--config {config} --set optimizer.lr=-1", "optimizer.lr"),
    (TRAIN, "--config {config} --set optimizer.min_lr=1", "optimizer.min_lr"),
    (TRAIN, "--config {config} --set data.train={missing}", "data.train"),
    (TRAIN, "--config {config} --set checkpoint.dir={file}", "checkpoint.dir"),
    (TRAIN, "--config {config} --set logging.dir={file}/log", "logging.dir"),
    (TRAIN, "--config {config} --set checkpoint.init_from={missing}", "checkpoint.init_from"),
    (TRAIN, "--config {config} --local_rank x", "--local_rank"),

    (DATA, "build --source-dir {folder} --out {out} --vocab-size 0", "--vocab-size"),
    (DATA, "build --source-dir {folder} --out {out} --workers 0", "--workers"),
    (DATA, "build --source-dir {folder} --out {out} --min-chars -1", "--min-chars"),
    (DATA, "build --source-dir {folder} --out {out} --validation-fraction -0.1", "--validation-fraction"),
    (DATA, "build --source-dir {missing} --out {out}", "--source-dir"),
    (DATA, "build --source-dir {file} --out {out}", "--source-dir"),
    (DATA, "build --source-dir {folder} --out {file}", "--out"),
    (DATA, "build --source-dir {folder} --out {out} --tokenizer {missing}", "--tokenizer"),
    (DATA, "build --source-dir {folder} --out {out} --cache-dir {file}", "--cache-dir"),
    (DATA, "corpus --source-dir {folder} --out {file}", "--out"),
    (DATA, "corpus --source-dir {missing} --out {out}", "--source-dir"),
    (DATA, "tokenizer --input {missing} --output {out}", "--input"),
    (DATA, "tokenizer --input {folder} --output {out}", "--input"),
    (DATA, "tokenizer --input {docs} --output {folder}", "--output"),
    (DATA, "tokenizer --input {docs} --output {file}/x.model", "--output"),
    (DATA, "tokenizer --input {docs} --output {out} --vocab-size 0", "--vocab-size"),
    (DATA, "tokenizer --input {docs} --output {out} --max-sentences 0", "--max-sentences"),
    (DATA, "copies --input {missing} --output {out}", "--input"),
    (DATA, "copies --input {folder} --output {out}", "--input"),
    (DATA, "copies --input {docs} --output {folder}", "--output"),
    (DATA, "copies --input {docs} --output {out} --max-lines 0", "--max-lines"),
    (DATA, "preprocess --input {missing} --tokenizer {file} --output-prefix {out}", "--input"),
    (DATA, "preprocess --input {docs} --tokenizer {missing} --output-prefix {out}", "--tokenizer"),
    (DATA, "preprocess --input {docs} --tokenizer {file} --output-prefix {folder}", "--output-prefix"),
    (DATA, "preprocess --input {docs} --tokenizer {file} --output-prefix {file}/x", "--output-prefix"),
    (DATA, "preprocess --input {docs} --tokenizer {file} --output-prefix {out} --workers 0", "--workers"),
    (DATA, "pretrained no-such-model --out {out}", "name"),
    (DATA, "pretrained smollm2-135m-instruct --out {file} --cache-dir {out}", "--out"),
    (DATA, "check {missing}", "{missing}"),
    (DATA, "check {missing} --vocab-size 0", "--vocab-size"),
    (DATA, "check {missing} --tokenizer {missing}", "--tokenizer"),

    (RECALL_TASK, "--out {out} --num-keys 0", "--num-keys"),
    (RECALL_TASK, "--out {out} --num-values -1", "--num-values"),
    (RECALL_TASK, "--out {out} --statements 0", "--statements"),
    (RECALL_TASK, "--out {out} --max-back -1", "--max-back"),
    (RECALL_TASK, "--out {out} --lead-filler -1", "--lead-filler"),
    (RECALL_TASK, "--out {out} --train-documents 0", "--train-documents"),
    (RECALL_TASK, "--out {out} --validation-documents -1", "--validation-documents"),
    (RECALL_TASK, "--out {out} --seed -1", "--seed"),
    (RECALL_TASK, "--out {file}", "--out"),

    (EVAL, "--checkpoint {file}", "--checkpoint"),
    (EVAL, "--checkpoint {missing} --set model.memory_sizee=64", "model.memory_sizee"),
    (EVAL, "--checkpoint {missing} --long-range-context 0", "--long-range-context"),
    (EVAL, "--checkpoint {missing} --reference-window -256", "--reference-window"),
    (EVAL, "--checkpoint {missing} --data {missing}", "--data"),
    (EVAL, "--checkpoint {missing} --out {file}", "--out"),

    (RECALL, "--checkpoint {missing} --max-steps 0", "--max-steps"),
    (RECALL, "--checkpoint {missing} --out {file}", "--out"),

    (LOOKUP_HEADS, "--checkpoint {missing} --segments 0", "--segments"),
    (LOOKUP_HEADS, "--checkpoint {missing} --n -1", "--n"),
    (LOOKUP_HEADS, "--checkpoint {missing} --threshold -1", "--threshold"),
    (MEMORY_LOOKUPS, "--checkpoint {missing} --segments 0", "--segments"),
    (MEMORY_LOOKUPS, "--checkpoint {missing} --n -1", "--n"),
    (MEMORY_LOOKUPS, "--checkpoint {missing} --out {file}", "--out"),

    (INSPECT, "--checkpoint {missing} --document -1", "--document"),
    (INSPECT, "--checkpoint {missing} --top 0", "--top"),
    (INSPECT, "--checkpoint {missing} --html {folder}", "--html"),

    (COMPARE, "{missing}", "evaluations"),
    (COMPARE, "{folder}", "perplexity.json"),
    (COMPARE, "{evaluation} --out {folder}", "--out"),
    (COMPARE, "{evaluation} --out-steps {file}/steps.png", "--out-steps"),

    (CURVES, "{missing}", "runs"),
    (CURVES, "{file}", "runs"),
    (CURVES, "{folder}", "--scalar"),
    (CURVES, "{folder} --smooth 0", "--smooth"),
    (CURVES, "{folder} --rows 0", "--rows"),
    (CURVES, "{folder} --out {folder}", "--out"),

    (EXPORT, "--checkpoint {missing} --output {out}", "--checkpoint"),
    (EXPORT, "--checkpoint {missing} --output {out} --memory-size 0", "--memory-size"),
    (EXPORT, "--checkpoint {missing} --output {file}/x", "--output"),
    (EXPORT, "--checkpoint {missing} --output {out} --tokenizer {missing}", "--tokenizer"),
    (EXPORT, "--checkpoint {missing} --output {out} --max-shard-size lots", "--max-shard-size"),

    (IMPORT, "--hf-model {missing} --output {out}", "--hf-model"),
    (IMPORT, "--hf-model {file} --output {out}", "{file}"),
    (IMPORT, "--hf-model {folder} --output {file}", "--output"),
    (IMPORT, "--hf-model {missing} --output {out} --set model.memory_sizee=64", "model.memory_sizee"),
    (IMPORT, "--hf-model {missing} --output {out} --set optimizer.lr=1", "optimizer.lr"),
]


def case_id(case):
    module, argv, _ = case
    return f"{module.rsplit('.', 1)[-1]} {argv}"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")  # file:line: SomeWarning: message (its source line follows)


def error_lines(stderr: str) -> list[str]:
    """stderr's lines less what is not the tool's own line: Python warnings that imported libraries
    print (with the source line under each), and argparse's usage above its error line."""
    lines, after_warning = [], False
    for line in stderr.splitlines():
        if WARNING.match(line):
            after_warning = True
        elif not (after_warning and line.startswith(" ")) and line.strip():
            lines.append(line)
            after_warning = False
    usage = next((i for i, line in enumerate(lines) if line.startswith("usage: ")), None)
    if usage is not None and ": error: " in lines[-1]:
        lines = lines[:usage] + lines[-1:]
    return lines


def make_folder(tmp_path: Path) -> dict[str, Path]:
    """The case's folder: what the placeholders of CASES name."""
    (tmp_path / "a_file").write_text("not what the argument takes\n")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "0", "source": "test", "text": "x = 1\n"}) + "\n")
    (tmp_path / "config.yaml").write_text((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "perplexity.json").write_text("{}\n")
    return dict(file=tmp_path / "a_file", folder=tmp_path / "a_folder", missing=tmp_path / "missing",
                out=tmp_path / "out", docs=tmp_path / "docs.jsonl", config=tmp_path / "config.yaml",
                evaluation=tmp_path / "evaluation")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_a_bad_argument_is_one_line_naming_it_exit_2_and_nothing_written(case, tmp_path):
    module, argv, named = case
    paths = make_folder(tmp_path)
    args = [arg.format(**paths) for arg in shlex.split(argv)]
    before = snapshot(tmp_path)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)

    shown = f"exit {result.returncode}\nstdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-3000:]}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr, shown
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and named.format(**paths) in lines[0], shown
    assert snapshot(tmp_path) == before, shown
