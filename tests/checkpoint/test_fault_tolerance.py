"""Fault tolerance of real 2-rank training jobs (torchrun, PP=2, CPU gloo, configs/tiny.yaml).

A rank killed while a checkpoint is being written, a stop signal that reaches one rank only, and a rank lost
mid-run under ``torchrun --max-restarts``: each time the run continues from the newest complete checkpoint and
ends with exactly the losses of an uninterrupted run (fp32 on CPU is deterministic, so the floats logged in
metrics.jsonl are compared with ``==``). Faults come from tests/faults.py (``MTP_FAULT``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from mtp_megatron.checkpoint import store

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300  # per job; a 2-rank tiny job takes 10-20 s
LOSS_KEYS = ["loss"] + [f"loss/head_{i}" for i in range(1, 5)]
_TAG = "MTP_FAULT_TEST_JOB"  # every process of a job inherits it: how leftovers are found and killed


def _args(run_dir, iters: int, interval: int) -> list[str]:
    return ["--config", "configs/tiny.yaml", "parallel.pp=2", "model.seq_length=64", "logging.tensorboard=false",
            f"train.iters={iters}", f"checkpoint.interval={interval}", f"run.dir={run_dir}"]


def _torchrun(module: str, args: list[str], max_restarts: int = 0) -> list[str]:
    # --standalone: a free rendezvous port per job (several jobs and test sessions share this machine).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            f"--max-restarts={max_restarts}", "-m", module, *args]


class Job:
    """One torchrun job in the background, its stdout/stderr in files under ``log_dir``."""

    def __init__(self, cmd: list[str], log_dir, name: str, **env: str):
        self.tag = uuid.uuid4().hex
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        inherited = {key: value for key, value in os.environ.items() if key != "MTP_FAULT"}
        env = {**inherited, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", _TAG: self.tag, **env}
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job timed out after {timeout} s\n{self.tail()}")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def tail(self) -> str:
        return f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-5000:]}"

    def workers(self) -> dict[int, int]:
        """{rank: pid} of the worker processes (the torchrun agent's children)."""
        found = {}
        for pid in _pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    found[int(_environ(pid)["RANK"])] = pid
            except (OSError, KeyError, ValueError):
                continue
        return found

    def kill(self) -> None:
        """SIGKILL every process of this job still alive (torchrun, its workers, helpers orphaned by a killed
        worker: dist_checkpointing's Manager and resource tracker), found by the job's tag."""
        for pid in _pids():
            if _environ(pid).get(_TAG) == self.tag:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(10)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()]


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


@pytest.fixture
def jobs():
    """Start jobs with ``jobs(cmd, log_dir, name, **env)``; whatever is left of them is killed at the end."""
    started: list[Job] = []

    def start(*args, **env) -> Job:
        started.append(Job(*args, **env))
        return started[-1]

    try:
        yield start
    finally:
        for job in started:
            job.kill()


def _losses(run_dir) -> dict[int, tuple[float, ...]]:
    """{step: (loss, loss/head_1..4)} from metrics.jsonl, the last record of each step (a resumed run appends)."""
    found = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/head_1" in record:
            found[record["step"]] = tuple(record[key] for key in LOSS_KEYS)
    return dict(sorted(found.items()))


def _newest_logged_step(run_dir) -> int:
    """The newest step in metrics.jsonl while the run may still be writing it (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # complete lines only
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines), default=0)


def _run_state(run_dir) -> dict:
    return json.loads((run_dir / "run_state.json").read_text())


def _latest(run_dir) -> str:
    return (run_dir / "checkpoints" / store.LATEST).read_text().strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(iters, interval)``: the per-step losses of an uninterrupted run with that config (cached)."""
    cache = {}

    def get(iters: int, interval: int) -> dict[int, tuple[float, ...]]:
        if (iters, interval) not in cache:
            folder = tmp_path_factory.mktemp(f"reference_{iters}_{interval}")
            job = Job(_torchrun("mtp_megatron.train", _args(folder / "run", iters, interval)), folder, "reference")
            try:
                assert job.wait() == 0, job.tail()
            finally:
                job.kill()
            losses = _losses(folder / "run")
            assert list(losses) == list(range(1, iters + 1))
            cache[iters, interval] = losses
        return cache[iters, interval]

    return get


@pytest.mark.distributed
def test_rank_killed_during_save_leaves_previous_checkpoint_and_resume_matches(tmp_path, jobs, reference):
    """Rank 1 dies while the step-6 checkpoint is written (its shards on disk, the save not finalized): the job
    fails, step 6 is never committed and ``latest`` stays at step 4. The next start drops the partial folder,
    resumes from step 4 and logs steps 5-8 with exactly the uninterrupted run's losses."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cmd = _torchrun("tests.faults", _args(run_dir, iters=8, interval=2))
    job = jobs(cmd, tmp_path, "killed", MTP_FAULT="kill_during_save=6,rank=1")
    assert job.wait() != 0, job.tail()
    assert "[fault] rank 1: SIGKILL while saving step 6" in job.stdout, job.tail()

    assert not (ckpts / "iter_0000006" / store.MANIFEST).exists()
    assert store.problems(str(ckpts / "iter_0000006"))  # absent, or present without a manifest
    partial = (ckpts / "iter_0000006.tmp").is_dir()  # the dead save's shards, unless rank 0 removed them
    assert _latest(run_dir) == "iter_0000004"
    assert [os.path.basename(p) for p in store.committed(str(ckpts))] == ["iter_0000002", "iter_0000004"]
    assert store.problems(str(ckpts / "iter_0000004")) == []
    # Rank 0 saw the save fail (its peer's connection closed) and said so before torchrun stopped it.
    assert _run_state(run_dir)["state"] == "failed"
    assert max(_losses(run_dir)) == 6

    job = jobs(_torchrun("mtp_megatron.train", _args(run_dir, iters=8, interval=2)), tmp_path, "resumed")
    assert job.wait() == 0, job.tail()
    assert f"resumed from {ckpts / 'iter_0000004'} at step 4" in job.stdout, job.tail()
    assert not partial or "iter_0000006.tmp: a save that did not finish; deleting it" in job.stderr
    assert not (ckpts / "iter_0000006.tmp").exists()
    assert store.problems(str(ckpts / "iter_0000006")) == [] and _latest(run_dir) == "iter_0000008"
    state = _run_state(run_dir)
    assert (state["state"], state["step"], state["consumed_samples"]) == ("finished", 8, 64)

    losses, expected = _losses(run_dir), reference(8, 2)
    assert list(losses) == list(range(1, 9))
    assert {s: losses[s] for s in range(5, 9)} == {s: expected[s] for s in range(5, 9)}
    assert losses == expected


@pytest.mark.distributed
def test_rank_0_killed_between_the_renames_of_a_commit_loses_no_checkpoint(tmp_path, jobs, reference):
    """Rank 0 dies committing step 6: every file and the manifest written, ``iter_0000006.tmp`` not yet renamed.
    The next start commits that complete save (it used to delete it and go back to step 4), resumes at step 6
    and ends with exactly the uninterrupted run's losses."""
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    job = jobs(_torchrun("tests.faults", _args(run_dir, iters=8, interval=2)), tmp_path, "killed",
               MTP_FAULT="kill_during_commit=6,rank=0")
    assert job.wait() != 0, job.tail()
    assert "[fault] rank 0: SIGKILL while committing step 6" in job.stdout, job.tail()
    assert (ckpts / "iter_0000006.tmp" / store.MANIFEST).exists() and _latest(run_dir) == "iter_0000004"

    job = jobs(_torchrun("mtp_megatron.train", _args(run_dir, iters=8, interval=2)), tmp_path, "resumed")
    assert job.wait() == 0, job.tail()
    assert "its save had finished and its commit was cut short; committed it now" in job.stdout, job.tail()
    assert f"resumed from {ckpts / 'iter_0000006'} at step 6" in job.stdout, job.tail()
    assert not (ckpts / "iter_0000006.tmp").exists() and _latest(run_dir) == "iter_0000008"
    losses, expected = _losses(run_dir), reference(8, 2)
    assert losses == expected


@pytest.mark.distributed
def test_sigusr1_to_one_worker_stops_all_ranks_and_rerun_finishes_identically(tmp_path, jobs, reference):
    """SIGUSR1 sent to rank 1's worker only (not to torchrun): both ranks stop together at the next step
    boundary, save that step and exit 0 with run_state ``stopped``; the same command again finishes the run with
    exactly the uninterrupted run's losses."""
    iters = 12
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    cmd = _torchrun("mtp_megatron.train", _args(run_dir, iters=iters, interval=0))
    job = jobs(cmd, tmp_path, "signalled")

    deadline = time.monotonic() + TIMEOUT_S
    while _newest_logged_step(run_dir) < 3:
        assert job.proc.poll() is None, f"the job ended before step 3\n{job.tail()}"
        assert time.monotonic() < deadline, f"no step 3 within {TIMEOUT_S} s\n{job.tail()}"
        time.sleep(0.05)
    workers = job.workers()
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGUSR1)

    assert job.wait() == 0, job.tail()
    state = _run_state(run_dir)
    step = state["step"]
    assert (state["state"], state["reason"]) == ("stopped", "received SIGUSR1"), state
    assert 3 <= step < iters and state["consumed_samples"] == 8 * step
    assert f"[stop] received SIGUSR1: stopped at step {step} of {iters} after saving a checkpoint" in job.stdout
    name = f"iter_{step:07d}"
    assert store.problems(str(ckpts / name)) == [] and _latest(run_dir) == name
    assert store.read_manifest(str(ckpts / name))["step"] == step
    assert max(_losses(run_dir)) == step

    job = jobs(cmd, tmp_path, "rerun")
    assert job.wait() == 0, job.tail()
    assert f"resumed from {ckpts / name} at step {step}" in job.stdout, job.tail()
    state = _run_state(run_dir)
    assert (state["state"], state["step"]) == ("finished", iters)

    losses, expected = _losses(run_dir), reference(iters, 0)
    assert list(losses) == list(range(1, iters + 1))
    assert {s: losses[s] for s in range(step + 1, iters + 1)} == {s: expected[s] for s in range(step + 1, iters + 1)}
    assert losses == expected


@pytest.mark.distributed
def test_torchrun_restart_after_a_lost_rank_resumes_and_matches(tmp_path, jobs, reference):
    """Rank 1 SIGKILLs itself after step 5; ``torchrun --max-restarts 1`` restarts both ranks, which resume from
    the step-4 checkpoint and finish with exactly the uninterrupted run's losses.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torch 2.13's torchrun hands restarted workers the first attempt's
    TCPStore without a per-attempt prefix, so the new process groups read the dead workers' keys (static
    rendezvous: gloo "Connection refused" to the old rank 0; --standalone: init hangs). With the opt-out each
    attempt gets a fresh store on a fresh port.
    """
    run_dir = tmp_path / "run"
    cmd = _torchrun("tests.faults", _args(run_dir, iters=8, interval=2), max_restarts=1)
    job = jobs(cmd, tmp_path, "restarted", MTP_FAULT="kill_rank=1,at_step=5", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert job.wait() == 0, job.tail()
    assert job.stdout.count("[fault] rank 1: SIGKILL after step 5") == 1, job.tail()  # the first attempt only
    assert f"resumed from {run_dir / 'checkpoints' / 'iter_0000004'} at step 4" in job.stdout, job.tail()
    state = _run_state(run_dir)
    assert (state["state"], state["step"], state["consumed_samples"]) == ("finished", 8, 64)
    assert _latest(run_dir) == "iter_0000008"

    losses, expected = _losses(run_dir), reference(8, 2)
    assert list(losses) == list(range(1, 9))
    assert {s: losses[s] for s in range(5, 9)} == {s: expected[s] for s in range(5, 9)}
    assert losses == expected


def test_fault_specs_parse_strictly(monkeypatch, capsys):
    """MTP_FAULT is parsed strictly: a typo fails the command (status 2) instead of running without a fault."""
    from tests import faults

    assert faults.parse("kill_rank=1,at_step=5") == {"kill_rank": 1, "at_step": 5}
    assert faults.parse(" kill_during_save=6 , rank=1 ") == {"kill_during_save": 6, "rank": 1}
    assert faults.parse("kill_during_commit=6,rank=0") == {"kill_during_commit": 6, "rank": 0}
    for bad in ("kill_rank=1", "kill_rank=1,at_step=x", "kill_rank=1,at_stp=5", "kill_during_save=6,rank=1,at_step=2",
                "kill_rank=1,at_step=5,kill_during_save=6,rank=1", "at_step=5"):
        with pytest.raises(ValueError):
            faults.parse(bad)
    monkeypatch.setenv(faults.ENV, "kill_rank=1")
    assert faults.main(["--config", "configs/tiny.yaml"]) == 2
    assert "MTP_FAULT" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not faults.first_attempt()


def _descendants(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = open(f"/proc/{pid}/task/{task}/children").read().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_checkpoint_helper_processes_die_with_a_killed_rank(tmp_path):
    """megatron-core's checkpoint writer starts helper processes (a spawned Manager and its resource tracker);
    after the rank is SIGKILLed none of them may live on."""
    job = subprocess.Popen(
        [sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", "train.iters=500",
         "checkpoint.interval=1", "model.seq_length=32", "logging.tensorboard=false", f"run.dir={tmp_path}/run"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    helpers = []
    try:
        for line in job.stdout:
            if "[checkpoint] saved" in line:
                break
        helpers = _descendants(job.pid)
        assert helpers, "the save started no helper process: nothing to check"
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in helpers if _running(pid)], "helper processes outlived their rank"
    finally:
        job.kill()
        for pid in helpers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
