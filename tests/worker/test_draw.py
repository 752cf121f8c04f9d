"""draw_tokens: exact inverse-CDF draws under min-p / top-k / top-p, batch independent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shardline.worker.draw import CANDIDATES, draw_tokens

VOCAB = 3000
UNIFORMS = [(i + 0.5) / 40 for i in range(40)]


def reference(row: np.ndarray, k: int, p: float, min_p: float, u: float) -> int:
    """The textbook definition, with a full stable sort and float64 throughout."""
    probs = np.exp(row - row.max())
    probs = probs / probs.sum()
    if min_p > 0:
        probs = np.where(probs < min_p * probs.max(), 0.0, probs)
    if not (0 < k < len(row)) and p >= 1.0:
        cdf = np.cumsum(probs)
        return int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    order = np.argsort(-row, kind="stable")
    weights = probs[order]
    if 0 < k < len(row):
        weights[k:] = 0.0
    if p < 1.0:
        before = np.concatenate([[0.0], np.cumsum(weights)[:-1]])
        weights = np.where(before >= p * weights.sum(), 0.0, weights)
    cdf = np.cumsum(weights)
    return int(order[np.searchsorted(cdf, u * cdf[-1], side="right")])


def draw_grid(row: torch.Tensor, k: int, p: float, min_p: float, mates: int = 0) -> list[int]:
    """Draw for `row` at every uniform of the grid in one batch, optionally beside batch mates
    with other settings (the row is repeated, one copy per uniform)."""
    gen = torch.Generator().manual_seed(99)
    n = len(UNIFORMS)
    others = [torch.randn(VOCAB, generator=gen) * 2 for _ in range(mates)]
    out = draw_tokens(
        torch.stack([row] * n + others),
        top_k=[k] * n + [5, -1, 40][:mates],
        top_p=[p] * n + [1.0, 0.5, 0.9][:mates],
        min_p=[min_p] * n + [0.0] * mates,
        uniforms=UNIFORMS + [0.3] * mates,
    )
    return [int(t) for t in out[:n]]


@pytest.mark.parametrize(
    ("scale", "k", "p", "min_p"),
    [
        (3.0, -1, 1.0, 0.0),  # plain temperature sampling
        (3.0, 20, 1.0, 0.0),
        (3.0, -1, 0.8, 0.0),  # top-p within the first CANDIDATES tokens
        (0.05, -1, 0.9, 0.0),  # nearly flat: top-p needs more than CANDIDATES tokens
        (3.0, 50, 0.7, 0.0),
        (3.0, -1, 1.0, 0.05),
        (1.0, 200, 0.95, 0.01),
    ],
)
def test_draws_match_the_reference_and_ignore_batch_mates(
    scale: float, k: int, p: float, min_p: float
) -> None:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(int(scale * 100) + k)) * scale
    expected = [reference(row.double().numpy(), k, p, min_p, u) for u in UNIFORMS]
    assert draw_grid(row, k, p, min_p) == expected
    assert draw_grid(row, k, p, min_p, mates=3) == expected
    assert len(set(expected)) > 3  # the grid of uniforms spreads over several tokens


def test_flat_top_p_really_needs_the_fallback() -> None:
    """Guard for the parametrised case above: its top-p mass lies beyond CANDIDATES."""
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(int(0.05 * 100) - 1)) * 0.05
    probs = torch.softmax(row.double(), -1).sort(descending=True).values
    assert probs[:CANDIDATES].sum() < 0.9
    tokens = set(draw_grid(row, -1, 0.9, 0.0))
    ranks = {int((row > row[t]).sum()) for t in tokens}
    assert max(ranks) >= CANDIDATES
