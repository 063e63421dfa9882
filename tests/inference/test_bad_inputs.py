"""The decoding, evaluation and conversion commands on bad input: one ``error:`` line naming the problem and the
fix, exit 2, no traceback, nothing written. Each command's ``main`` runs in this process (the argument parsing
included), on the trained model the decoding tests share."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil

import pytest

from mtp_megatron import evaluate, generate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _convert_main():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(REPO, "tools", "convert_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _exit_and_stderr(main, *args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
    return code, err.getvalue()


def _assert_one_error(code: int, stderr: str, *expected: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    for text in expected:
        assert text in stderr, stderr


@pytest.fixture(scope="module")
def damaged(trained, tmp_path_factory):
    """A copy of the trained checkpoint with one shard truncated."""
    folder = str(tmp_path_factory.mktemp("damaged") / "iter_0000030")
    shutil.copytree(trained, folder)
    shard = sorted(name for name in os.listdir(folder) if name.endswith(".distcp"))[0]
    with open(os.path.join(folder, shard), "r+b") as f:
        f.truncate(100)
    return folder, shard


def test_generate_refuses_what_it_cannot_do(trained, damaged, tmp_path):
    # seq_length 64 (tests/inference/conftest.py), n=4 heads
    cases = [
        (["--prompt", "abc", "--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
        (["--prompt", "", "--max-new-tokens", "4"], ["prompt '' is empty"]),
        (["--prompt", "abc", "--max-new-tokens", "70"], ["needs 72 positions", "trained on 64", "--max-new-tokens 62"]),
        (["--prompt", "abc", "--max-new-tokens", "60", "--speculative"],
         ["and 3 drafts", "--max-new-tokens 59 or less"]),
    ]
    for args, expected in cases:
        _assert_one_error(*_exit_and_stderr(generate.main, "--checkpoint", trained, *args), *expected)
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n  \n")
    _assert_one_error(*_exit_and_stderr(generate.main, "--checkpoint", trained, "--prompt-file", str(blank)),
                      "holds no prompt")
    folder, shard = damaged
    _assert_one_error(*_exit_and_stderr(generate.main, "--checkpoint", folder, "--prompt", "abc"),
                      shard, "truncated")


def test_evaluate_and_convert_refuse_what_they_cannot_do(trained, cycles_dataset, damaged, tmp_path):
    _assert_one_error(*_exit_and_stderr(evaluate.main, "--checkpoint", trained, "--data", cycles_dataset,
                                        "--seq-length", "128"), "--seq-length 128 is past the 64 positions")
    _assert_one_error(*_exit_and_stderr(evaluate.main, "--checkpoint", trained, "--data", cycles_dataset,
                                        "--max-samples", "0"), "--max-samples must be at least 1")
    folder, shard = damaged
    convert = _convert_main()
    _assert_one_error(*_exit_and_stderr(convert, "--input", folder, "--output", f"{tmp_path}/out", "--to", "hf"),
                      shard)
    _assert_one_error(*_exit_and_stderr(convert, "--input", trained, "--output", f"{tmp_path}/out", "--to",
                                        "megatron", "--n-heads", "2"), "--n-heads 2", "drop --n-heads")
    assert not os.path.exists(f"{tmp_path}/out")
    # A Hugging Face folder whose weights file is cut short: named.
    hf_folder = f"{tmp_path}/hf"
    assert convert(["--input", trained, "--output", hf_folder, "--to", "hf"]) == 0
    weights = os.path.join(hf_folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    _assert_one_error(*_exit_and_stderr(convert, "--input", hf_folder, "--output", f"{tmp_path}/back", "--to",
                                        "megatron"), weights, "truncated or corrupt")
