"""Multi-node launcher: run this once per node; it checks the config, waits for every node, then execs torchrun
with a c10d rendezvous for mtp_megatron.train.

    # on every node (node 0 hosts the rendezvous):
    python launcher/torchrun.py --nnodes 16 --node-rank $NODE --nproc-per-node 8 \\
        --master-addr node001 --master-port 29500 -- --config configs/13b.yaml train.iters=100

Every option falls back to the environment, so under SLURM (slurm/entrypoint.sh) or any scheduler that exports
the usual variables it needs none: ``--nnodes`` NNODES or SLURM_NNODES (default 1), ``--node-rank`` NODE_RANK or
SLURM_NODEID (default 0), ``--nproc-per-node`` NPROC_PER_NODE (default: the visible GPUs, else 1),
``--master-addr`` MASTER_ADDR (node 0's address; required on the other nodes, node 0 defaults to 127.0.0.1),
``--master-port`` MASTER_PORT (default 29500), ``--rdzv-id`` RDZV_ID or SLURM_JOB_ID, ``--rdzv-timeout``
RDZV_TIMEOUT (seconds, default 900), ``--max-restarts`` MAX_RESTARTS (default 0). Everything after ``--`` goes
to ``mtp_megatron.train`` unchanged (``--config FILE`` and ``section.key=value`` overrides).

Before torchrun starts, in this order:
* the training config is loaded and checked for the whole job (world size = nnodes x nproc-per-node), as
  mtp_megatron/train.py does: a bad config exits 2 with one ``error:`` message from node 0 and one short line
  from every other node, instead of every rank's message and torchrun's failure report per rank. Only the
  config package is imported (not megatron-core, not torch), so this takes well under a second;
* with more than one node, an arrival check: node 0 listens on MASTER_PORT + 1, every other node connects and
  says its node rank, and node 0 answers all of them once every node is there. If that does not happen within
  ``--rdzv-timeout`` seconds, every node that got this far exits 1 naming the node ranks that arrived and those
  that did not (torchrun's own c10d rendezvous can time out, ``join_timeout``, but does not say who is missing).
  Plain sockets, not a TCPStore: no torch import before torchrun, signals are handled at once (no blocking call
  in C++), and a node that leaves while waiting (its connection closes) no longer counts as arrived. The port is
  closed before torchrun starts, and torchrun's rendezvous gets the same timeout as its ``join_timeout``, so a
  node lost in between cannot hang the others either;
* SIGTERM or SIGINT end the launcher at once with a message and exit status 128 + the signal's number; nothing
  has started that could save anything yet. SIGUSR1 ("save and stop") is ignored: there is nothing to save.

What it sets up around torchrun, and why:
* torchrun replaces this process (exec), so its exit status is the launcher's and srun's signals reach it and
  its workers exactly as if it had been started directly;
* c10d rendezvous at MASTER_ADDR:MASTER_PORT, hosted by node rank 0 (``is_host`` is explicit, so several nodes on
  one machine, as in tests, do not all try to host it);
* SIGTERM and SIGUSR1 reach the training processes themselves, which save a checkpoint at the next step boundary
  and exit 0 (mtp_megatron/training/stopping.py): torchrun ignores both, instead of tearing its workers down on
  SIGTERM (``TORCHELASTIC_SIGNALS_TO_HANDLE``) or dying of SIGUSR1 (its default action);
* ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for a tensor-parallel run that may use GPUs, unless already set (see
  mtp_megatron/distributed/cuda_env.py);
* with ``--max-restarts`` > 0, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torch 2.13 hands restarted workers the
  first attempt's store, whose stale keys make the new process groups fail (see
  tests/checkpoint/test_fault_tolerance.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import socket
import sys
import time

DEFAULT_RDZV_TIMEOUT_S = 900.0
PROGRESS_EVERY_S = 60.0  # node 0 says who it still waits for this often
REPLY_GRACE_S = 30.0  # how much longer than its own timeout a node waits for node 0's answer


class LaunchError(Exception):
    """Ends the launcher with ``error: <message>`` on stderr and exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Interrupted(Exception):
    """SIGTERM or SIGINT before torchrun started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------------------------
# Arguments


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
    """Our options (before ``--``) and the training arguments (after it). Raises ``LaunchError`` when a node
    other than 0 has no master address."""
    if "--" in argv:
        split = argv.index("--")
        ours, train_args = argv[:split], argv[split + 1:]
    else:
        ours, train_args = argv, []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnodes", type=int, default=_env_int("NNODES", "SLURM_NNODES", default=1))
    parser.add_argument("--node-rank", type=int, default=_env_int("NODE_RANK", "SLURM_NODEID", default=0))
    parser.add_argument("--nproc-per-node", type=int, default=None)
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR") or None)
    parser.add_argument("--master-port", type=int, default=_env_int("MASTER_PORT", default=29500))
    parser.add_argument("--rdzv-id", default=os.environ.get("RDZV_ID") or os.environ.get("SLURM_JOB_ID") or "mtp")
    parser.add_argument("--rdzv-timeout", type=float,
                        default=float(os.environ.get("RDZV_TIMEOUT") or DEFAULT_RDZV_TIMEOUT_S),
                        help=f"seconds to wait for every node (default {DEFAULT_RDZV_TIMEOUT_S:g}, or RDZV_TIMEOUT)")
    parser.add_argument("--max-restarts", type=int, default=_env_int("MAX_RESTARTS", default=0))
    args = parser.parse_args(ours)
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1} (--nnodes {args.nnodes})")
    if not 1 <= args.master_port < 65535:  # the arrival check needs the port above it too
        parser.error(f"--master-port {args.master_port} is outside 1..65534")
    if not args.rdzv_timeout > 0:
        parser.error(f"--rdzv-timeout {args.rdzv_timeout:g} must be > 0 seconds")
    if args.master_addr is None:
        if args.node_rank != 0:
            # Defaulting to 127.0.0.1 here would make this node wait for a rendezvous host on its own machine.
            raise LaunchError(f"node {args.node_rank} of {args.nnodes} needs node 0's address: pass "
                              "--master-addr HOST or set MASTER_ADDR")
        args.master_addr = "127.0.0.1"
    if args.nproc_per_node is None:
        args.nproc_per_node = _default_nproc()
    return args, train_args


# ---------------------------------------------------------------------------------------------------------------
# The training config, checked once for the whole job


def _training_arguments(train_args: list[str]) -> argparse.Namespace | None:
    """``--config`` and the overrides as mtp_megatron/train.py reads them; None when there is nothing to check
    here (help requests, or options this launcher does not know: train.py answers those itself)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--help-config", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("overrides", nargs="*")
    known, unknown = parser.parse_known_args(train_args)
    if unknown or known.help or known.help_config:
        return None
    return known


def check_training_config(args: argparse.Namespace, train_args: list[str]):
    """Load the config and check the launch for world size nnodes x nproc-per-node as mtp_megatron/train.py does
    (``check_launch``: the world size, the training data, the tokenizer and data files, the DeepSpeed JSON) and
    return it (None when there is nothing to check: help requests, unknown options); raises ``LaunchError``
    (code 2).

    Node 0 reports the problems; the other nodes find the same ones (same files, same arguments) and say only
    that, so a job's log holds the list once.
    """
    known = _training_arguments(train_args)
    if known is None:
        return None
    import yaml

    from mtp_megatron.config import ConfigError, load_config
    from mtp_megatron.train import check_launch

    world = args.nnodes * args.nproc_per_node
    try:
        cfg = load_config(known.config, known.overrides)
        check_launch(cfg, world)
    except ConfigError as error:
        if args.node_rank == 0:
            raise LaunchError(str(error)) from None
        first = " ".join(error.problems[0].split())
        raise LaunchError(f"node {args.node_rank}: the training config is invalid; node 0 reports the problems "
                          f"(first: {first[:160]})") from None
    except OSError as error:  # the config file itself: missing or unreadable
        raise LaunchError(f"cannot read {error.filename or known.config}: {error.strerror}. Fix: pass "
                          "--config with an existing YAML file (configs/tiny.yaml, configs/13b.yaml, ...)") from None
    except yaml.YAMLError as error:
        raise LaunchError(f"{known.config} is not valid YAML: {' '.join(str(error).split())}") from None
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# The arrival check: node 0 waits until every node has connected, then answers them all


def _ranks(ranks) -> str:
    """Node ranks as compact ranges: 0-3,7."""
    ranks, parts = sorted(ranks), []
    start = None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(str(start) if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(parts) or "none"


def _timeout_message(nnodes: int, arrived, timeout_s: float) -> str:
    missing = sorted(set(range(nnodes)) - set(arrived))
    return (f"rendezvous timed out after {timeout_s:g} s: {len(arrived)} of {nnodes} nodes arrived (node ranks "
            f"{_ranks(arrived)}), missing node ranks {_ranks(missing)}. Fix: start the launcher on every node with "
            f"--nnodes {nnodes} and the same --master-addr/MASTER_ADDR and --master-port/MASTER_PORT, or wait "
            "longer with --rdzv-timeout/RDZV_TIMEOUT")


def _send(sock: socket.socket, message: dict) -> None:
    try:
        sock.settimeout(5)
        sock.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # that node is gone; it reports for itself


def _listen(port: int) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as error:
        raise LaunchError(f"node 0 cannot listen on port {port} for the arrival check (--master-port + 1): "
                          f"{error.strerror}. Fix: choose another --master-port or MASTER_PORT") from None


def _hello_problem(hello: dict, args: argparse.Namespace, arrived: dict) -> str | None:
    if hello.get("rdzv_id") != args.rdzv_id or hello.get("nnodes") != args.nnodes:
        return (f"node 0 runs rendezvous {args.rdzv_id!r} of {args.nnodes} nodes, this node "
                f"{hello.get('rdzv_id')!r} of {hello.get('nnodes')}: pass the same --rdzv-id and --nnodes "
                "everywhere")
    rank = hello.get("node_rank")
    if not isinstance(rank, int) or not 0 < rank < args.nnodes:
        return f"node rank {rank!r} is not one of 1..{args.nnodes - 1}"
    if rank in arrived:
        return f"node rank {rank} has already arrived from {arrived[rank]}: give every node its own --node-rank"
    return None


def host_arrivals(args: argparse.Namespace) -> None:
    """Node 0: wait until every node has connected (or the timeout); answer them all; raise on timeout."""
    server = _listen(args.master_port + 1)
    deadline = time.monotonic() + args.rdzv_timeout
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    arrived = {0: socket.gethostname()}  # node rank -> host
    buffers: dict[socket.socket, bytes] = {}  # connections that have not said who they are yet
    joined: dict[socket.socket, int] = {}  # connection -> node rank
    print(f"[launcher] node 0/{args.nnodes}: waiting up to {args.rdzv_timeout:g} s for the other nodes on port "
          f"{args.master_port + 1}", flush=True)
    try:
        while len(arrived) < args.nnodes and time.monotonic() < deadline:
            if time.monotonic() >= next_progress:
                missing = sorted(set(range(args.nnodes)) - set(arrived))
                print(f"[launcher] node 0/{args.nnodes}: {len(arrived)} nodes arrived, still waiting for node ranks "
                      f"{_ranks(missing)} ({deadline - time.monotonic():.0f} s left)", flush=True)
                next_progress += PROGRESS_EVERY_S
            wait_s = min(deadline, next_progress) - time.monotonic()
            readable, _, _ = select.select([server, *buffers, *joined], [], [], max(wait_s, 0))
            for sock in readable:
                if sock is server:
                    conn, _ = server.accept()
                    buffers[conn] = b""
                    continue
                try:
                    data = sock.recv(4096)
                except OSError:  # reset: the same as closed
                    data = b""
                if sock in joined:  # a node never speaks again; this is it closing (stopped or failed)
                    if not data:
                        arrived.pop(joined.pop(sock), None)
                        sock.close()
                    continue
                if not data:
                    del buffers[sock]
                    sock.close()
                    continue
                buffers[sock] += data
                if b"\n" in buffers[sock]:
                    _admit(sock, buffers.pop(sock), args, arrived, joined)
        complete = len(arrived) == args.nnodes
        answer = {"ok": True} if complete else {"ok": False, "arrived": sorted(arrived),
                                                 "timeout_s": args.rdzv_timeout}
        for sock in joined:
            _send(sock, answer)
    finally:
        for sock in [*buffers, *joined, server]:
            sock.close()
    if not complete:
        raise LaunchError(f"node 0: {_timeout_message(args.nnodes, arrived, args.rdzv_timeout)}", code=1)


def _admit(sock: socket.socket, line: bytes, args: argparse.Namespace, arrived: dict, joined: dict) -> None:
    try:
        hello = json.loads(line.split(b"\n", 1)[0])
        problem = _hello_problem(hello, args, arrived) if isinstance(hello, dict) else "not a launcher"
    except ValueError:
        problem = "not a launcher"
    if problem:  # tell that node, and keep waiting for the right one
        _send(sock, {"ok": False, "error": problem})
        sock.close()
        print(f"[launcher] node 0/{args.nnodes}: refused a connection: {problem}", flush=True)
        return
    arrived[hello["node_rank"]] = str(hello.get("host"))
    joined[sock] = hello["node_rank"]


def join_arrivals(args: argparse.Namespace) -> None:
    """Any node but 0: connect to node 0 (retrying until the timeout), say who we are, wait for its answer."""
    address, port = args.master_addr, args.master_port + 1
    deadline = time.monotonic() + args.rdzv_timeout
    print(f"[launcher] node {args.node_rank}/{args.nnodes}: waiting up to {args.rdzv_timeout:g} s for node 0 at "
          f"{address}:{port}", flush=True)
    sock = None
    while sock is None:
        try:
            sock = socket.create_connection((address, port), timeout=max(min(2.0, deadline - time.monotonic()), 0.1))
        except socket.gaierror as error:
            raise LaunchError(f"node {args.node_rank}: cannot resolve node 0's address {address!r} "
                              f"(--master-addr/MASTER_ADDR): {error.strerror}") from None
        except OSError:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"node {args.node_rank}: rendezvous timed out after {args.rdzv_timeout:g} s: node 0 never "
                    f"answered at {address}:{port} (missing node rank 0, and it alone knows about the others). "
                    "Fix: start node 0 too, check that --master-addr/MASTER_ADDR is its address, or wait longer "
                    "with --rdzv-timeout/RDZV_TIMEOUT", code=1) from None
            time.sleep(0.5)
    with sock:
        hello = {"rdzv_id": args.rdzv_id, "nnodes": args.nnodes, "node_rank": args.node_rank,
                 "host": socket.gethostname()}
        sock.sendall(json.dumps(hello).encode() + b"\n")
        # Node 0 answers by its own deadline, which is at most one timeout after this connection.
        answer = _read_answer(sock, time.monotonic() + args.rdzv_timeout + REPLY_GRACE_S)
    if answer is None:
        raise LaunchError(f"node {args.node_rank}: node 0 at {address}:{port} ended the rendezvous without an "
                          "answer (it was stopped or failed; its log says why)", code=1)
    if answer.get("error"):
        raise LaunchError(f"node {args.node_rank}: node 0 refused this node: {answer['error']}")
    if not answer.get("ok"):
        message = _timeout_message(args.nnodes, answer.get("arrived", []), answer.get("timeout_s", 0))
        raise LaunchError(f"node {args.node_rank}: {message}", code=1)


def _read_answer(sock: socket.socket, deadline: float) -> dict | None:
    data = b""
    while b"\n" not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            chunk = sock.recv(4096)
        except OSError:  # timed out, or reset by node 0's host
            return None
        if not chunk:
            return None
        data += chunk
    try:
        return json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# torchrun


def torchrun_command(args: argparse.Namespace, train_args: list[str]) -> list[str]:
    is_host = "true" if args.node_rank == 0 else "false"
    join_timeout = math.ceil(args.rdzv_timeout)
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={args.nnodes}", f"--nproc-per-node={args.nproc_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={args.master_addr}:{args.master_port}",
        f"--rdzv-id={args.rdzv_id}", f"--rdzv-conf=is_host={is_host},join_timeout={join_timeout}",
        f"--max-restarts={args.max_restarts}",
        "-m", "mtp_megatron.train", *train_args,
    ]


def launch_environment(args: argparse.Namespace, cfg=None) -> dict[str, str]:
    """torchrun's environment, which its workers inherit: this one, plus what the launcher and the training config
    ``cfg`` (``check_training_config``'s) need."""
    env = dict(os.environ)
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    if args.max_restarts > 0:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if cfg is not None:
        from mtp_megatron.distributed.cuda_env import launch_variables

        # CUDA_DEVICE_MAX_CONNECTIONS=1 for TP on GPUs, read when each worker creates its CUDA context. A value the
        # user exported wins; mtp_megatron.train warns about it on rank 0.
        for name, value in launch_variables(cfg).items():
            env.setdefault(name, value)
    return env


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


def wait_for_nodes(args: argparse.Namespace) -> None:
    """The arrival check, where there are other nodes to wait for."""
    if args.nnodes == 1:
        return
    if args.node_rank == 0:
        host_arrivals(args)
    else:
        join_arrivals(args)


def main(argv: list[str] | None = None) -> int:
    # Until torchrun runs, SIGTERM/SIGINT end the launcher with a message; SIGUSR1 has nothing to save yet.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    who = "the launcher"
    try:
        args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
        who = f"node {args.node_rank} of {args.nnodes}"
        cfg = check_training_config(args, train_args)
        wait_for_nodes(args)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.code
    except Interrupted as stop:
        print(f"error: {who}: received {stop} while waiting to start; stopped before training started (nothing "
              "to save)", file=sys.stderr, flush=True)
        return 128 + stop.signum
    cmd = torchrun_command(args, train_args)
    print(f"[launcher] node {args.node_rank}/{args.nnodes}: {' '.join(cmd)}", flush=True)
    # Inherited across exec by torchrun; its workers install their own handlers for both (StopRequests). SIGINT
    # goes back to its default, which torchrun replaces with its own (TORCHELASTIC_SIGNALS_TO_HANDLE).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execve(cmd[0], cmd, launch_environment(args, cfg))
    return 1  # not reached: execve replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
