"""Launcher for clusters that start jobs with MPI: every MPI process becomes one training rank.

    mpirun -np 16 -npernode 8 python launcher/mpirun.py --config configs/13b.yaml train.iters=100

mpi4py gives each process its rank, the world size and its rank within the node (a shared-memory
sub-communicator, so it works under any MPI, not only Open MPI's ``OMPI_COMM_WORLD_*`` variables). Rank 0 picks
the rendezvous address (``MASTER_ADDR``, else its own host's address) and a free port (``MASTER_PORT``, else one
the OS gives it) and broadcasts them, and the ranks are mapped onto torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) before ``mtp_megatron.train`` starts. MPI itself only
carries this handshake; training talks NCCL on GPU and gloo on CPU. The arguments are mtp_megatron.train's.
"""

from __future__ import annotations

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


def map_mpi_ranks() -> dict[str, str]:
    """torchrun's environment variables for this MPI process (collective over MPI_COMM_WORLD)."""
    from mpi4py import MPI

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


def main(argv: list[str] | None = None) -> int:
    os.environ.update(map_mpi_ranks())
    from mtp_megatron.train import main as train_main

    return train_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
