"""The parallel topology as pure arithmetic: TP x PP x DP, checked without any process group.

Everything here is a function of (world_size, tp, pp), so it is tested on one CPU process and used by the
launchers' config check (``validate_for_world``) before ``torch.distributed`` is initialised. Context and expert
parallelism are not used (cp = ep = 1).
"""

from dataclasses import dataclass
from typing import List, Tuple

from mtp_megatron.config.errors import ConfigError
from mtp_megatron.config.schema import Config
from mtp_megatron.config.validate import problems as config_problems


@dataclass(frozen=True)
class ParallelDims:
    """How ``world_size`` ranks split into tensor-, pipeline- and (derived) data-parallel groups."""

    world_size: int
    """Total number of ranks (processes, one per device)."""

    tp: int = 1
    """Tensor-parallel size."""

    pp: int = 1
    """Pipeline-parallel size."""

    @property
    def dp(self) -> int:
        """Data-parallel size: the ranks left over once each model replica has tp * pp of them."""
        return self.world_size // (self.tp * self.pp)

    def problems(self) -> List[str]:
        """Each reason this layout cannot run, as ``field: problem. Fix: ...``; empty when it is valid."""
        problems = []
        for name, size in (("world size", self.world_size), ("parallel.tp", self.tp), ("parallel.pp", self.pp)):
            if size < 1:
                problems.append(f"{name}: must be >= 1, got {size}. Fix: use a positive size")
        if not problems and self.world_size % (self.tp * self.pp) != 0:
            problems.append(
                f"parallel.tp/pp: world size {self.world_size} is not a multiple of tp*pp={self.tp * self.pp} "
                f"(tp={self.tp}, pp={self.pp}). Fix: launch with a multiple of {self.tp * self.pp} processes or "
                f"change parallel.tp/pp"
            )
        return problems

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every problem of this layout."""
        problems = self.problems()
        if problems:
            raise ConfigError.from_problems(problems)

    def num_microbatches(self, global_batch: int, micro_batch: int) -> int:
        """Microbatches per optimizer step on each DP rank: global / (micro * dp), which must divide exactly."""
        self.validate()
        if micro_batch < 1:
            raise ConfigError(f"train.micro_batch_size: must be >= 1, got {micro_batch}. Fix: use 1 or more")
        per_step = micro_batch * self.dp
        if global_batch < 1 or global_batch % per_step != 0:
            raise ConfigError(
                f"train.global_batch_size: {global_batch} is not a positive multiple of "
                f"micro_batch_size*dp = {micro_batch}*{self.dp} = {per_step}. "
                f"Fix: use {suggest_multiples(global_batch, per_step)}"
            )
        return global_batch // per_step

    def rank_coords(self, rank: int) -> Tuple[int, int, int]:
        """(tp_rank, pp_rank, dp_rank) of a global rank.

        megatron-core's default order is "tp-cp-ep-dp-pp" (``initialize_model_parallel(order=...)``), the first
        name varying fastest. ``RankGenerator`` in megatron/core/parallel_state.py (0.16.1, checked) builds its
        groups from ``generate_masked_orthogonal_rank_groups``, whose docstring gives
            global_rank = tp_rank + dp_rank * tp + pp_rank * tp * dp
        when cp = ep = 1. So TP neighbours are adjacent ranks (same node, NVLink) and pipeline stages are the
        farthest apart. tests/distributed/test_topology.py compares this against RankGenerator itself.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return tp_rank, pp_rank, dp_rank


def suggest_multiples(value: int, unit: int) -> str:
    """The multiples of ``unit`` nearest to ``value``, phrased for an error message."""
    lower = (value // unit) * unit
    options = [m for m in (lower, lower + unit) if m > 0]
    return " or ".join(f"{m} ({m // unit} microbatch{'es' if m // unit != 1 else ''} per step)" for m in options)


def validate_for_world(cfg: Config, world_size: int) -> ParallelDims:
    """``validate`` plus the checks that need the world size, in one ``ConfigError``; returns the resulting
    ``ParallelDims``. Here rather than in the config package, which knows nothing of process layouts."""
    dims = ParallelDims(world_size=world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    problems = config_problems(cfg)
    layout_problems = dims.problems()
    problems += layout_problems
    train = cfg.train
    if not layout_problems and train.micro_batch_size >= 1:
        per_step = train.micro_batch_size * dims.dp
        if train.global_batch_size % per_step != 0:
            problems.append(
                f"train.global_batch_size: {train.global_batch_size} is not a multiple of micro_batch_size*dp = "
                f"{train.micro_batch_size}*{dims.dp} = {per_step} (dp = world size {world_size} / "
                f"(tp {dims.tp} * pp {dims.pp})), so the number of microbatches would be "
                f"{train.global_batch_size / per_step:g}. "
                f"Fix: use {suggest_multiples(train.global_batch_size, per_step)}"
            )
    if problems:
        raise ConfigError.from_problems(problems)
    return dims
