import math

import pytest
import torch

from miaotui.config import SamplingParams
from miaotui.engine.sampler import (
    apply_repetition_penalty,
    make_generator,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def expected_top_p(probs: list[float], p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for i in order:
        keep.add(i)
        mass += probs[i]
        if mass >= p - 1e-9:
            break
    return keep


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_top_k_keeps_k_highest(k):
    out = top_k_filter(logits_of(PROBS), k)
    assert kept(out) == set(sorted(range(5), key=lambda i: -PROBS[i])[:k])


def test_top_k_disabled_and_ties():
    x = logits_of(PROBS)
    assert torch.equal(top_k_filter(x, 0), x)
    tied = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    assert kept(top_k_filter(tied, 2)) == {0, 2, 3}  # both tokens tied at the boundary survive


@pytest.mark.parametrize("p", [0.3, 0.5, 0.6, 0.7, 0.71, 0.85, 0.86, 0.95, 0.99])
def test_top_p_keeps_smallest_nucleus(p):
    assert kept(top_p_filter(logits_of(PROBS), p)) == expected_top_p(PROBS, p)


def test_top_p_brief_examples_and_edges():
    x = logits_of(PROBS)
    assert kept(top_p_filter(x, 0.7)) == {0, 1}
    assert kept(top_p_filter(x, 0.71)) == {0, 1, 2}
    assert kept(top_p_filter(x, 1e-6)) == {0}  # the top token always survives
    assert torch.equal(top_p_filter(x, 1.0), x)
    shuffled = [0.1, 0.5, 0.05, 0.2, 0.15]
    assert kept(top_p_filter(logits_of(shuffled), 0.7)) == {1, 3}
    tied = logits_of([0.4, 0.3, 0.3])
    assert kept(top_p_filter(tied, 0.5)) == {0, 1, 2}  # ties with the last kept token are kept


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
def test_top_p_large_nucleus_matches_full_sort(scale):
    # flat distributions put thousands of tokens in the nucleus, past the filter's first top-k guess
    torch.manual_seed(3)
    x = torch.randn(2, 20_000) * scale
    for p in (0.5, 0.9, 0.99):
        probs = torch.softmax(x, -1)
        top = probs.sort(-1, descending=True).values
        n_keep = ((top.cumsum(-1) - top) < p * (1 - 1e-5)).sum(-1, keepdim=True)
        want = probs >= top.gather(-1, n_keep - 1)
        assert torch.equal(torch.isfinite(top_p_filter(x, p)), want)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.3, 0.31, 0.4, 0.5, 1.0])
def test_min_p_keeps_relative_threshold(p):
    want = {i for i, q in enumerate(PROBS) if q >= p * max(PROBS) - 1e-9}
    assert kept(min_p_filter(logits_of(PROBS), p)) == want


def test_min_p_brief_example():
    assert kept(min_p_filter(logits_of(PROBS), 0.3)) == {0, 1, 2}  # p >= 0.15
    x = logits_of(PROBS)
    assert torch.equal(min_p_filter(x, 0.0), x)


def test_filters_batch_rows_independent():
    rows = [PROBS, [0.05, 0.1, 0.15, 0.2, 0.5], [0.2] * 5]
    x = torch.stack([logits_of(r) for r in rows])
    for fn, arg in [(top_k_filter, 2), (top_p_filter, 0.7), (min_p_filter, 0.3)]:
        out = fn(x, arg)
        assert out.shape == x.shape
        for b, r in enumerate(rows):
            assert kept(out[b]) == kept(fn(logits_of(r), arg)), (fn.__name__, b)


def test_filters_do_not_mutate_and_keep_dtype():
    x = logits_of(PROBS).to(torch.bfloat16)
    before = x.clone()
    for out in (top_k_filter(x, 2), top_p_filter(x, 0.7), min_p_filter(x, 0.3)):
        assert out.dtype == torch.bfloat16
    assert torch.equal(x, before)


def test_repetition_penalty_matches_hand_computation():
    x = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
    out = apply_repetition_penalty(x, torch.tensor([0, 1, 1, 4]), 2.0)
    assert torch.equal(out, torch.tensor([1.0, -2.0, 0.5, -3.0, 0.0]))
    assert torch.equal(x, torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0]))  # input untouched
    assert torch.equal(apply_repetition_penalty(x, torch.tensor([], dtype=torch.long), 2.0), x)


def test_repetition_penalty_batch():
    x = torch.tensor([[2.0, -1.0, 4.0], [2.0, -1.0, 4.0]])
    shared = apply_repetition_penalty(x, torch.tensor([2]), 4.0)
    assert torch.equal(shared, torch.tensor([[2.0, -1.0, 1.0], [2.0, -1.0, 1.0]]))
    per_row = apply_repetition_penalty(x, torch.tensor([[0], [1]]), 4.0)
    assert torch.equal(per_row, torch.tensor([[0.5, -1.0, 4.0], [2.0, -4.0, 4.0]]))


def test_repetition_penalty_in_sample_changes_argmax():
    x = torch.tensor([3.0, 2.0, 0.0])
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample(x, greedy, None).item() == 0
    assert sample(x, greedy, None, history=torch.tensor([0])).item() == 1  # 3/2 < 2


def test_temperature_zero_is_argmax_for_any_seed():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    params = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.2)
    for seed in range(50):
        assert torch.equal(sample(logits, params, make_generator(seed)), logits.argmax(-1))
    assert sample(logits[0], params, make_generator(None)).item() == logits[0].argmax().item()


def test_same_seed_same_tokens():
    torch.manual_seed(1)
    logits = torch.randn(3, 500)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=100)
    g1, g2 = make_generator(1234), make_generator(1234)
    a = [sample(logits, params, g1) for _ in range(100)]
    b = [sample(logits, params, g2) for _ in range(100)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    g3 = make_generator(4321)
    c = [sample(logits, params, g3) for _ in range(100)]
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_unseeded_generators_differ():
    logits = torch.zeros(1000)
    params = SamplingParams(temperature=1.0, top_p=1.0)
    draws = {sample(logits, params, make_generator(None)).item() for _ in range(20)}
    assert len(draws) > 1  # 20 draws from 1000 equal tokens: all equal has chance 1e-57


def test_output_shapes_and_dtypes():
    params = SamplingParams(temperature=0.7)
    one = sample(torch.randn(50, dtype=torch.bfloat16), params, make_generator(0))
    assert one.shape == () and one.dtype == torch.long
    batch = sample(torch.randn(3, 50, dtype=torch.float16), params, make_generator(0))
    assert batch.shape == (3,) and batch.dtype == torch.long
    assert sample(torch.randn(3, 50), SamplingParams(temperature=0), None).shape == (3,)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    exp = probs * n
    mask = exp > 0
    return float(((counts[mask] - exp[mask]) ** 2 / exp[mask]).sum())


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0, top_p=1.0),
        dict(temperature=0.5, top_p=1.0),
        dict(temperature=1.0, top_k=3, top_p=1.0),
        dict(temperature=1.0, top_p=0.85),
        dict(temperature=1.0, top_p=1.0, min_p=0.25),
        dict(temperature=2.0, top_k=4, top_p=0.9, min_p=0.1),
    ],
)
def test_sampling_frequencies_match_filtered_distribution(kw):
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.05, 0.02], dtype=torch.float64)
    params = SamplingParams(**kw)
    # reference distribution computed directly from the probabilities, not through the filters
    q = probs ** (1 / params.temperature)
    q = q / q.sum()
    allowed = torch.ones(len(q), dtype=torch.bool)
    if params.top_k:
        allowed &= q >= q.sort(descending=True).values[params.top_k - 1]
    if params.top_p < 1:
        r = q * allowed
        r = r / r.sum()
        nucleus = expected_top_p(r.tolist(), params.top_p)
        allowed &= torch.tensor([i in nucleus for i in range(len(q))])
    if params.min_p > 0:
        r = q * allowed
        r = r / r.sum()
        allowed &= r >= params.min_p * r.max()
    want = q * allowed
    want = want / want.sum()

    n = 20_000
    logits = probs.log().float().expand(n, -1)  # one batched draw of n samples
    got = torch.bincount(sample(logits, params, make_generator(7)), minlength=len(q)).double()
    assert (got[~allowed] == 0).all()
    dof = int(allowed.sum()) - 1
    # mean dof, sd sqrt(2 dof): 6 sd is never hit by chance, yet catches any wrong distribution
    assert _chi_square(got, want) < dof + 6 * math.sqrt(2 * max(dof, 1))
