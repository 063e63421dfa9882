"""Multi-node launcher: run this once per node; it execs torchrun with a c10d rendezvous for mtp_megatron.train.

    # on every node (node 0 hosts the rendezvous):
    python launcher/torchrun.py --nnodes 16 --node-rank $NODE --nproc-per-node 8 \\
        --master-addr node001 --master-port 29500 -- --config configs/13b.yaml train.iters=100

Every option falls back to the environment, so under SLURM (slurm/entrypoint.sh) or any scheduler that exports
the usual variables it needs none: ``--nnodes`` NNODES or SLURM_NNODES (default 1), ``--node-rank`` NODE_RANK or
SLURM_NODEID (default 0), ``--nproc-per-node`` NPROC_PER_NODE (default: the visible GPUs, else 1),
``--master-addr`` MASTER_ADDR (default 127.0.0.1), ``--master-port`` MASTER_PORT (default 29500),
``--rdzv-id`` RDZV_ID or SLURM_JOB_ID, ``--max-restarts`` MAX_RESTARTS (default 0). Everything after ``--`` goes
to ``mtp_megatron.train`` unchanged (``--config FILE`` and ``section.key=value`` overrides).

What it sets up around torchrun, and why:
* c10d rendezvous at MASTER_ADDR:MASTER_PORT, hosted by node rank 0 (``is_host`` is explicit, so several nodes on
  one machine, as in tests, do not all try to host it);
* SIGTERM and SIGUSR1 reach the training processes themselves, which save a checkpoint at the next step boundary
  and exit 0 (mtp_megatron/training/stopping.py): torchrun ignores both, instead of tearing its workers down on
  SIGTERM (``TORCHELASTIC_SIGNALS_TO_HANDLE``) or dying of SIGUSR1 (its default action);
* with ``--max-restarts`` > 0, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torch 2.13 hands restarted workers the
  first attempt's store, whose stale keys make the new process groups fail (see
  tests/checkpoint/test_fault_tolerance.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def _default_nproc() -> int:
    if os.environ.get("NPROC_PER_NODE"):
        return int(os.environ["NPROC_PER_NODE"])
    try:
        import torch

        return torch.cuda.device_count() or 1
    except ImportError:
        return 1


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        ours, train_args = argv[:split], argv[split + 1:]
    else:
        ours, train_args = argv, []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnodes", type=int, default=_env_int("NNODES", "SLURM_NNODES", default=1))
    parser.add_argument("--node-rank", type=int, default=_env_int("NODE_RANK", "SLURM_NODEID", default=0))
    parser.add_argument("--nproc-per-node", type=int, default=None)
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    parser.add_argument("--master-port", type=int, default=_env_int("MASTER_PORT", default=29500))
    parser.add_argument("--rdzv-id", default=os.environ.get("RDZV_ID") or os.environ.get("SLURM_JOB_ID") or "mtp")
    parser.add_argument("--max-restarts", type=int, default=_env_int("MAX_RESTARTS", default=0))
    args = parser.parse_args(ours)
    if args.nproc_per_node is None:
        args.nproc_per_node = _default_nproc()
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1} (--nnodes {args.nnodes})")
    return args, train_args


def torchrun_command(args: argparse.Namespace, train_args: list[str]) -> list[str]:
    is_host = "true" if args.node_rank == 0 else "false"
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={args.nnodes}", f"--nproc-per-node={args.nproc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
        f"--rdzv-id={args.rdzv_id}", f"--rdzv-conf=is_host={is_host}",
        f"--max-restarts={args.max_restarts}",
        "-m", "mtp_megatron.train", *train_args,
    ]


def launch_environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    if args.max_restarts > 0:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def main(argv: list[str] | None = None) -> None:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    cmd = torchrun_command(args, train_args)
    print(f"[launcher] node {args.node_rank}/{args.nnodes}: {' '.join(cmd)}", flush=True)
    # Inherited across exec by torchrun; its workers install their own handlers for both (StopRequests).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.execve(cmd[0], cmd, launch_environment(args))


if __name__ == "__main__":
    main()
