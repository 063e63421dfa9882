"""python -m mtp_megatron.evaluate_code --samples: HumanEval's canonical solutions score 1, broken completions 0
without hanging; an MBPP file in the official format is read and scored; bad input exits 2 with one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mtp_megatron.codeeval.tasks import humaneval

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def evaluate_code(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """The entry point in a fresh process."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mtp_megatron.evaluate_code", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _summary(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def _records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_canonical_humaneval_solutions_all_pass(tmp_path):
    problems = humaneval()
    assert len(problems) == 164
    samples = _write_jsonl(tmp_path / "canonical.jsonl",
                           [{"task_id": p.task_id, "completion": p.solution} for p in problems])
    out = tmp_path / "scored.jsonl"
    summary = _summary(evaluate_code("--samples", samples, "--task", "humaneval", "--output", str(out),
                                     "--timeout", "10", "--workers", "2"))
    failed = [r["task_id"] for r in _records(out) if not r["passed"]]
    assert not failed, failed
    assert summary["pass@1"] == 1.0 and summary["tasks"] == 164 and summary["samples"] == 164


BROKEN = {
    "wrong": "    return None\n",
    "crash": "    return 1 // 0\n",
    "loop": "    while True:\n        pass\n",
    "memory": "    hog = [bytearray(2 ** 26) for _ in range(10 ** 6)]\n",
    "exit": "    import sys\n    sys.exit(0)\n",
}


def test_broken_completions_score_zero_within_their_time_limit(tmp_path):
    problems = humaneval()
    # Two samples of one task each: one broken, one canonical, so pass@1 is exactly 0.5 per task.
    rows = []
    for problem, (kind, body) in zip(problems, BROKEN.items()):
        rows += [{"task_id": problem.task_id, "completion": body}, {"task_id": problem.task_id,
                                                                     "completion": problem.solution}]
    out = tmp_path / "scored.jsonl"
    start = time.monotonic()
    summary = _summary(evaluate_code("--samples", _write_jsonl(tmp_path / "broken.jsonl", rows), "--task",
                                     "humaneval", "--output", str(out), "--timeout", "2", "--memory-mb", "512"))
    assert time.monotonic() - start < 60
    records = _records(out)
    assert [r["passed"] for r in records] == [False, True] * len(BROKEN)
    status = {kind: r["result"] for kind, r in zip(BROKEN, records[::2])}
    assert status["loop"] == "timed out" and status["wrong"] == status["crash"] == status["exit"] == "failed"
    assert status["memory"] in ("memory", "failed")
    assert "ZeroDivisionError" in records[2]["detail"]
    assert summary["pass@1"] == pytest.approx(0.5) and summary["tasks"] == len(BROKEN)


MBPP_ROWS = [
    {"task_id": 11, "text": "Write a python function to remove the first and last occurrence of a character.",
     "code": "def remove_Occ(s, ch):\n    i = s.find(ch)\n    j = s.rfind(ch)\n    if i < 0:\n        return s\n"
             "    if i == j:\n        return s[:i] + s[i + 1:]\n    return s[:i] + s[i + 1:j] + s[j + 1:]",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to sort a matrix by the sum of its rows.",
     "code": "def sort_matrix(M):\n    return sorted(M, key=sum)",
     "test_list": ["assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]]) == [[1, 1, 1], [1, 2, 3], [2, 4, 5]]",
                   "assert sort_matrix([[5, 8, 9], [6, 4, 3], [2, 1, 4]]) == [[2, 1, 4], [6, 4, 3], [5, 8, 9]]",
                   "assert sort_matrix([[1]]) == [[1]]"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 600, "text": "Write a function that returns the setup constant plus one.",
     "code": "def plus_one():\n    return BASE + 1",
     "test_list": ["assert plus_one() == 42"], "test_setup_code": "BASE = 41", "challenge_test_list": []},
]


def test_an_official_format_mbpp_file_is_read_and_scored(tmp_path):
    mbpp = _write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    samples = [{"task_id": "Mbpp/11", "completion": MBPP_ROWS[0]["code"]},
               {"task_id": "Mbpp/12", "completion": "def sort_matrix(M):\n    return M"},
               {"task_id": "Mbpp/600", "completion": MBPP_ROWS[2]["code"]}]
    out = tmp_path / "scored.jsonl"
    summary = _summary(evaluate_code("--samples", _write_jsonl(tmp_path / "s.jsonl", samples), "--task", "mbpp",
                                     "--mbpp-file", mbpp, "--mbpp-split", "all", "--output", str(out)))
    assert [r["passed"] for r in _records(out)] == [True, False, True]  # 600 needs its setup code
    assert summary["pass@1"] == pytest.approx(2 / 3) and summary["tasks"] == 3
    # The default split (task ids 11-510) leaves task 600 out: its sample is refused by name.
    result = evaluate_code("--samples", str(tmp_path / "s.jsonl"), "--task", "mbpp", "--mbpp-file", mbpp,
                           "--output", str(tmp_path / "again.jsonl"), expect=2)
    assert "'Mbpp/600' is not a problem of this task" in result.stderr
    assert not (tmp_path / "again.jsonl").exists()


@pytest.mark.parametrize("make_args, words", [
    (lambda t: ["--samples", "x.jsonl", "--task", "mbpp"], "--task mbpp needs --mbpp-file"),
    (lambda t: ["--samples", _write_jsonl(t / "s.jsonl", [{"task_id": "HumanEval/0"}]), "--task", "humaneval",
                "--output", str(t / "o.jsonl")], "line 1 lacks a task_id and a completion"),
    (lambda t: ["--samples", "x.jsonl", "--task", "mbpp", "--mbpp-file", _write_jsonl(t / "m.jsonl", [{"a": 1}]),
                "--output", str(t / "o.jsonl")], "line 1 is not an MBPP problem"),
    (lambda t: ["--samples", "x.jsonl", "--task", "humaneval", "--output", _write_jsonl(t / "o.jsonl", [])],
     "exists: give another path"),
    (lambda t: ["--checkpoint", "ckpt", "--task", "humaneval", "--samples-per-task", "5"], "at temperature 0"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, make_args, words):
    result = evaluate_code(*make_args(tmp_path), expect=2)
    assert words in result.stderr and result.stderr.count(words) == 1, result.stderr
