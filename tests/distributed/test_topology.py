"""ParallelDims: pure topology arithmetic, checked against megatron-core's own rank layout."""

import dataclasses

import pytest

from mtp_megatron.config import ConfigError
from mtp_megatron.distributed.topology import ParallelDims

LAYOUTS = [(1, 1, 1), (4, 1, 1), (8, 2, 1), (8, 1, 2), (8, 2, 2), (16, 2, 2), (12, 2, 3), (24, 4, 2), (32, 2, 4)]


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_dp_is_derived(world, tp, pp):
    dims = ParallelDims(world, tp, pp)
    dims.validate()
    assert dims.dp * dims.tp * dims.pp == world


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelDims(4, 2, 1).tp = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "world, tp, pp, expected",
    [
        (6, 4, 1, "world size 6 is not a multiple of tp*pp=4"),
        (4, 3, 1, "world size 4 is not a multiple of tp*pp=3"),
        (4, 0, 1, "parallel.tp: must be >= 1"),
        (0, 1, 1, "world size: must be >= 1"),
    ],
)
def test_invalid_layouts(world, tp, pp, expected):
    with pytest.raises(ConfigError) as e:
        ParallelDims(world, tp, pp).validate()
    assert expected in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize(
    "world, tp, pp, gbs, mbs, expected", [(8, 2, 2, 8, 2, 2), (4, 1, 1, 8, 2, 1), (1, 1, 1, 8, 1, 8)]
)
def test_num_microbatches(world, tp, pp, gbs, mbs, expected):
    assert ParallelDims(world, tp, pp).num_microbatches(gbs, mbs) == expected


def test_num_microbatches_rejects_an_uneven_split():
    message = r"10 is not a positive multiple of micro_batch_size\*dp = 2\*2 = 4\. Fix: use 8 .* or 12 "
    with pytest.raises(ConfigError, match=message):
        ParallelDims(4, 2, 1).num_microbatches(10, 2)
    with pytest.raises(ConfigError, match="train.micro_batch_size: must be >= 1"):
        ParallelDims(4, 2, 1).num_microbatches(8, 0)


def test_rank_coords_out_of_range():
    with pytest.raises(ValueError):
        ParallelDims(4, 2, 1).rank_coords(4)


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_rank_coords_match_megatron_rank_generator(world, tp, pp):
    parallel_state = pytest.importorskip("megatron.core.parallel_state")
    dims = ParallelDims(world, tp, pp)
    # The generator megatron-core's initialize_model_parallel builds for the dense model, with its default order.
    generator = parallel_state.RankGenerator(tp=tp, ep=1, dp=dims.dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    expected = {}
    for axis, name in enumerate(("tp", "pp", "dp")):
        # A rank's coordinate along an axis is its position inside its group along that axis.
        for group in generator.get_ranks(name):
            for position, rank in enumerate(group):
                expected.setdefault(rank, [None, None, None])[axis] = position
    assert sorted(expected) == list(range(world))
    for rank in range(world):
        assert dims.rank_coords(rank) == tuple(expected[rank]), f"rank {rank}"


def test_tp_ranks_are_adjacent_and_pipeline_stages_farthest_apart():
    dims = ParallelDims(8, 2, 2)  # dp 2
    assert [dims.rank_coords(r) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1),
    ]
