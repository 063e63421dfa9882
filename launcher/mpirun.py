"""Launcher for clusters that start jobs with MPI: every MPI process becomes one training rank.

    mpirun -np 16 -npernode 8 python launcher/mpirun.py --config configs/13b.yaml train.iters=100

mpi4py gives each process its rank, the world size and its rank within the node (a shared-memory
sub-communicator, so it works under any MPI, not only Open MPI's ``OMPI_COMM_WORLD_*`` variables). Rank 0 picks
the rendezvous address (``MASTER_ADDR``, else its own host's address) and a free port (``MASTER_PORT``, else one
the OS gives it) and broadcasts them, and the ranks are mapped onto torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) before ``mtp_megatron.train`` starts. MPI itself only
carries this handshake; training talks NCCL on GPU and gloo on CPU. The arguments are mtp_megatron.train's.

Before MPI starts, the CUDA variables the run needs are set in this process's environment (CUDA_DEVICE_MAX_CONNECTIONS=1
for tensor parallelism, mtp_megatron/distributed/cuda_env.py): a CUDA-aware MPI may initialise CUDA in MPI_Init,
and the CUDA runtime reads them only when it does. mtp_megatron.train checks them again (and warns about a value
that differs).

Without mpi4py, or with an mpi4py that cannot load an MPI library, it exits 2 with one line saying what to install
(said by MPI rank 0 only, which the MPI launcher's own environment names).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def _rendezvous_address() -> tuple[str, int]:
    address = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
    port = int(os.environ.get("MASTER_PORT", "0"))
    if not port:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    return address, port


INSTALL = "apt-get install libopenmpi-dev openmpi-bin (an MPI library), then pip install mpi4py"
# Set by the MPI launchers before any MPI call: Open MPI, PMIx, MPICH/Intel MPI (Hydra's PMI).
_LAUNCHER_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


class MPIUnavailable(Exception):
    """mpi4py is missing or cannot load an MPI library."""


def import_mpi():
    """``mpi4py.MPI``, or ``MPIUnavailable`` saying what is missing and how to install it."""
    try:
        from mpi4py import MPI
    except ModuleNotFoundError as error:
        if error.name not in ("mpi4py", "mpi4py.MPI"):
            raise
        raise MPIUnavailable(f"launcher/mpirun.py needs mpi4py, which is not installed. Fix: {INSTALL}") from None
    # mpi4py 4.x loads the MPI library when MPI is imported: ImportError (libmpi.so.N: cannot open shared object
    # file) from the extension module, or RuntimeError ("cannot load MPI library" and one line per path tried)
    # from mpi4py/_mpiabi.py.
    except (ImportError, RuntimeError) as error:
        detail = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise MPIUnavailable(f"mpi4py cannot load an MPI library ({detail}). Fix: {INSTALL}, or set MPI4PY_LIBMPI "
                             "to the libmpi.so of the MPI that mpirun belongs to") from None
    return MPI


def _is_rank_zero() -> bool:
    """Rank 0 by the MPI launcher's environment (no MPI call works here); true outside any launcher."""
    for name in _LAUNCHER_RANK_VARIABLES:
        if os.environ.get(name):
            return os.environ[name] == "0"
    return True


def map_mpi_ranks() -> dict[str, str]:
    """torchrun's environment variables for this MPI process (collective over MPI_COMM_WORLD)."""
    MPI = import_mpi()

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    address, port = world.bcast(_rendezvous_address() if world.Get_rank() == 0 else None, root=0)
    variables = {
        "RANK": world.Get_rank(), "WORLD_SIZE": world.Get_size(),
        "LOCAL_RANK": node.Get_rank(), "LOCAL_WORLD_SIZE": node.Get_size(),
        "MASTER_ADDR": address, "MASTER_PORT": port,
    }
    node.Free()
    return {key: str(value) for key, value in variables.items()}


def set_cuda_environment(train_args: list[str]) -> None:
    """The CUDA variables the run of ``train_args`` needs, where unset (mtp_megatron/distributed/cuda_env.py). A
    config that does not load is left for mtp_megatron.train to report, with its own exit code."""
    import yaml

    from mtp_megatron.config import ConfigError, load_config
    from mtp_megatron.distributed.cuda_env import launch_variables

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    known, _ = parser.parse_known_args(train_args)
    try:
        cfg = load_config(known.config, known.overrides)
    except (ConfigError, OSError, yaml.YAMLError):
        return
    for name, value in launch_variables(cfg).items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    train_args = sys.argv[1:] if argv is None else argv
    set_cuda_environment(train_args)  # before MPI_Init (map_mpi_ranks)
    try:
        os.environ.update(map_mpi_ranks())
    except MPIUnavailable as error:
        if _is_rank_zero():  # every rank fails alike; say it once
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    from mtp_megatron.train import main as train_main

    return train_main(train_args)


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
