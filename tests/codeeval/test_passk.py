"""pass@k equals the brute-force probability over every k-subset of a task's samples."""

from __future__ import annotations

import itertools

import pytest

from mtp_megatron.codeeval.passk import pass_at_k


def _brute_force(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n, k", [(1, 1), (5, 1), (5, 2), (6, 3), (8, 5), (10, 10), (12, 4)])
def test_pass_at_k_is_the_subset_probability(n, k):
    for c in range(n + 1):
        assert pass_at_k([n], [c], ks=(k,))[f"pass@{k}"] == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_averages_over_tasks_and_reports_only_ks_every_task_has():
    samples, correct = [10, 10, 12], [0, 3, 12]
    result = pass_at_k(samples, correct)
    assert set(result) == {"pass@1", "pass@10"}  # 100 samples per task are needed for pass@100
    expected = sum(_brute_force(n, c, 10) for n, c in zip(samples, correct)) / 3
    assert result["pass@10"] == pytest.approx(expected, abs=1e-12)
    assert result["pass@1"] == pytest.approx((0 + 0.3 + 1) / 3, abs=1e-12)
