"""slurm/train_13b.sh on a real Slurm cluster started on this machine (2 emulated nodes of 2 CPUs).

The same script as for the 13B run, with a tiny CPU config through its variables: one node, two nodes with a
real multi-node c10d rendezvous, a USR1 before the time limit that must end in a checkpoint, a requeue and a
resumed run identical to an uninterrupted one, and a failing run that must not be requeued.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from mtp_megatron.testing.slurm_cluster import SlurmCluster, missing_binaries

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITERS = 12
TINY = f"train.iters={ITERS} model.seq_length=64 logging.tensorboard=false parallel.pp=2 checkpoint.interval=0"
LOSS_KEYS = ["loss"] + [f"loss/head_{i}" for i in range(1, 5)]
JOB_TIMEOUT_S = 420

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
                    "slurm-client munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root")
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")), nodes=2, cpus_per_node=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def submit(cluster: SlurmCluster, tmp_path, nodes: int, overrides: str = TINY, name: str = "run") -> tuple[int, str]:
    run_dir = str(tmp_path / name)
    env = {"CONFIG": "configs/tiny.yaml", "RANKS_PER_NODE": "2", "RUN_DIR": run_dir, "OVERRIDES": overrides,
           "OMP_NUM_THREADS": "1"}
    job = cluster.sbatch([f"--nodes={nodes}", "--gpus-per-node=0", f"--output={tmp_path}/{name}-%j.out",
                          "slurm/train_13b.sh"], env=env, cwd=REPO)
    return job, run_dir


def log(tmp_path, name: str, job: int) -> str:
    path = tmp_path / f"{name}-{job}.out"
    return path.read_text() if path.exists() else ""


def losses(run_dir: str) -> dict[int, tuple]:
    found = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss/head_1" in record:
                found[record["step"]] = tuple(record[k] for k in LOSS_KEYS)
    return dict(sorted(found.items()))


def run_state(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "run_state.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_node_run(cluster, tmp_path_factory):
    """The tiny job on one node (2 ranks, PP=2), uninterrupted: the reference for the others."""
    tmp = tmp_path_factory.mktemp("one_node")
    job, run_dir = submit(cluster, tmp, nodes=1)
    info = cluster.wait(job, JOB_TIMEOUT_S)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log(tmp, "run", job)
    return run_dir


def test_one_node(one_node_run):
    state = run_state(one_node_run)
    assert (state["state"], state["step"]) == ("finished", ITERS)
    found = losses(one_node_run)
    assert list(found) == list(range(1, ITERS + 1))
    assert found[ITERS][0] < found[1][0] - 1.0  # it trained
    assert os.path.isdir(os.path.join(one_node_run, "checkpoints", f"iter_{ITERS:07d}"))


def test_two_nodes_rendezvous_and_match_one_node(cluster, tmp_path, one_node_run):
    """2 nodes x 2 ranks: PP=2 x DP=2 over a c10d rendezvous hosted by the first node. The same initial weights
    (the PP layout seeds them) and global batches as on one node, so the losses agree to float rounding."""
    job, run_dir = submit(cluster, tmp_path, nodes=2)
    info = cluster.wait(job, JOB_TIMEOUT_S)
    text = log(tmp_path, "run", job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "2 nodes x 2 ranks" in text and "node 1/2" in text and "is_host=false" in text
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "pp: 2" in f.read()
    two, one = losses(run_dir), losses(one_node_run)
    assert list(two) == list(one)
    for step in one:
        for a, b in zip(one[step], two[step]):
            assert abs(a - b) <= 1e-5 * abs(a), (step, one[step], two[step])


def test_usr1_checkpoints_requeues_and_resumes_identically(cluster, tmp_path, one_node_run):
    """USR1 to the batch script (what --signal=B:USR1@600 sends before the time limit): the run saves and stops,
    the job requeues itself, and the requeued job resumes there and finishes with the uninterrupted losses."""
    job, run_dir = submit(cluster, tmp_path, nodes=1)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2):
        assert time.monotonic() < deadline, log(tmp_path, "run", job)
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log(tmp_path, "run", job)
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])

    # The first attempt stops and requeues; the job then runs again (Restarts=1) and completes.
    while True:
        info = cluster.job(job)
        if info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1":
            break
        assert info.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT"), log(tmp_path, "run", job)
        assert time.monotonic() < deadline, (info, log(tmp_path, "run", job))
        time.sleep(0.5)
    text = log(tmp_path, "run", job)
    assert "USR1: asking the run to checkpoint and stop" in text
    assert "[stop] found the STOP file: stopped at step" in text
    assert f"requeueing job {job}" in text and f"job {job} (restart 1)" in text
    stopped_at = int(text.split("[stop] found the STOP file: stopped at step ")[1].split()[0])
    assert 2 <= stopped_at < ITERS
    assert f"resumed from {run_dir}/checkpoints/iter_{stopped_at:07d} at step {stopped_at}" in text
    state = run_state(run_dir)
    assert (state["state"], state["step"]) == ("finished", ITERS)
    assert not os.path.exists(os.path.join(run_dir, "STOP"))
    assert losses(run_dir) == losses(one_node_run)


def test_a_failed_run_is_not_requeued(cluster, tmp_path):
    job, _ = submit(cluster, tmp_path, nodes=1, overrides=f"{TINY} train.no_such_field=1")
    info = cluster.wait(job, JOB_TIMEOUT_S)
    text = log(tmp_path, "run", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text)
    assert "train.no_such_field" in text and "requeueing" not in text


def _training_rank(run_dir: str, rank: int):
    """The pid of training rank ``rank`` of the run in ``run_dir`` (its command line names the folder)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            environ = dict(item.split(b"=", 1) for item in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                           if b"=" in item)
        except OSError:
            continue
        if b"mtp_megatron.train" in cmdline and f"run.dir={run_dir}".encode() in cmdline and \
                environ.get(b"RANK") == str(rank).encode() and b"TORCHELASTIC_RUN_ID" in environ:
            return int(pid)
    return None


def test_a_killed_rank_0_leaves_a_failed_run_state(cluster, tmp_path):
    """Rank 0, which writes run_state.json, is SIGKILLed mid-run: the batch script says failed, not running,
    and does not requeue."""
    import signal

    job, run_dir = submit(cluster, tmp_path, nodes=1, overrides=TINY.replace(f"train.iters={ITERS}", "train.iters=500"))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    pid = None
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            pid = _training_rank(run_dir, 0)
            if pid:
                break
        time.sleep(0.5)
    assert pid, log(tmp_path, "run", job)
    os.kill(pid, signal.SIGKILL)
    info = cluster.wait(job, JOB_TIMEOUT_S)
    text = log(tmp_path, "run", job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, text)
    state = run_state(run_dir)
    assert state["state"] == "failed" and "while the run was running" in state["reason"], (state, text)


def test_code_eval_job_scores_each_checkpoint_once_next_to_the_losses(cluster, tmp_path, one_node_run):
    """slurm/code_eval.sh on the finished run: HumanEval on its checkpoint, pass@1 in the run's metrics.jsonl at
    the checkpoint's step; a second job finds nothing new to evaluate."""
    env = {"RUN_DIR": one_node_run, "EVAL_ARGS": "--limit 2 --max-new-tokens 8 --device cpu", "OMP_NUM_THREADS": "1"}
    jobs = []
    for name in ("first", "second"):
        job = cluster.sbatch(["--gpus-per-node=0", f"--output={tmp_path}/{name}-%j.out", "slurm/code_eval.sh"],
                             env=env, cwd=REPO)
        info = cluster.wait(job, JOB_TIMEOUT_S)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log(tmp_path, name, job)
        jobs.append(log(tmp_path, name, job))
    samples = os.path.join(one_node_run, "code_eval", f"iter_{ITERS:07d}_humaneval.jsonl")
    assert [json.loads(line)["task_id"] for line in open(samples)] == ["HumanEval/0", "HumanEval/1"]
    with open(os.path.join(one_node_run, "metrics.jsonl")) as f:
        logged = [r for r in map(json.loads, f) if "code/humaneval/pass@1" in r]
    assert [r["step"] for r in logged] == [ITERS]
    assert f"== iter_{ITERS:07d}: humaneval" in jobs[0] and "== iter_" not in jobs[1]
