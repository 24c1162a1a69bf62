"""Speculative decoding: greedy parity with plain decoding, exact limits, and the output law of sampling."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

from conftest import ARCHS
from miaotui.config import GenerationStats, SamplingParams
from miaotui.engine.generate import generate_tokens
from miaotui.engine.sampler import filtered_probs, make_generator, sample
from miaotui.engine.speculative import (
    DraftModelProposer,
    PromptLookupProposer,
    Proposal,
    draw,
    speculative_generate_tokens,
    verify_proposal,
)
from miaotui.models import model_class

pytestmark = pytest.mark.filterwarnings("ignore")

# repeats so that prompt lookup finds matches from the first step
PROMPT = [5, 17, 42, 99, 7, 3, 250, 12, 5, 17, 42, 99, 8, 61, 5, 17]
GREEDY = SamplingParams(temperature=0, max_tokens=56, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: thread start-up costs more than the matmuls, and other jobs may share the CPUs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_MODEL_TYPE = {"LlamaConfig": "llama", "MistralConfig": "mistral", "Qwen2Config": "qwen2", "GPT2Config": "gpt2"}


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Our model for a conftest ARCHS entry, randomly initialised here (no transformers import, no files)."""
    cfg_cls, _, kwargs = ARCHS[name]
    torch.manual_seed(seed)
    cfg = {"model_type": _MODEL_TYPE[cfg_cls], **kwargs, **overrides}
    model = model_class(cfg["model_type"]).from_config(cfg)
    model.tie_weights()
    with torch.no_grad():  # default init leaves biases/norms at 0/1: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models():
    """name → a fresh copy of a tiny model (two calls give two copies with equal weights)."""
    return tiny_model


def run(target, proposer, params=GREEDY, prompt=PROMPT, eos=(), seed=None):
    stats = GenerationStats()
    gen = make_generator(seed) if seed is not None else None
    out = list(speculative_generate_tokens(target, prompt, params, proposer, eos, generator=gen, stats=stats))
    return out, stats


# --- greedy: token for token what plain decoding gives ---------------------------------------------

# target → a draft with unrelated weights (tied-embedding tiny models mostly repeat the last token,
# so a tied target gets an untied draft, or the two would agree by accident)
OTHER = {"llama-gqa-untied": "gpt2", "mistral-sliding": "qwen2-bias", "gpt2": "llama-gqa-untied"}


@pytest.mark.parametrize("target_name", sorted(OTHER))
def test_greedy_matches_plain_decoding(target_name, models):
    target = models(target_name)
    expected = list(generate_tokens(target, PROMPT, GREEDY))
    same = models(target_name)  # an identical copy with its own cache
    other = models(OTHER[target_name])
    cases = [
        ("lookup-4", PromptLookupProposer(max_ngram=3, num_speculative=4)),
        ("other-3", DraftModelProposer(other, k=3)),
        ("same-4", DraftModelProposer(same, k=4)),
    ]
    if target_name == "llama-gqa-untied":  # the full grid on one target
        cases += [
            ("lookup-1", PromptLookupProposer(max_ngram=3, num_speculative=1)),
            ("lookup-7", PromptLookupProposer(max_ngram=2, num_speculative=7)),
            ("other-1", DraftModelProposer(other, k=1)),
            ("same-2", DraftModelProposer(same, k=2)),
            ("same-7", DraftModelProposer(same, k=7)),
            ("self-4", DraftModelProposer(target, k=4)),  # the target itself, sharing its cache
        ]
    rates = {}
    for label, proposer in cases:
        got, stats = run(target, proposer)
        assert got == expected, label
        spec = stats.extra["spec"]
        assert stats.completion_tokens == len(got) == GREEDY.max_tokens and stats.finish_reason == "length"
        assert spec["accepted"] <= spec["proposed"]
        assert spec["accepted"] + spec["target_forwards"] == len(got)  # each forward adds accepted + 1
        rates[label] = spec["acceptance_rate"]
    # a copy of the target always agrees: its cache followed every acceptance and rejection
    assert all(rate == 1.0 for label, rate in rates.items() if label.startswith(("same", "self"))), rates
    assert all(rate < 0.5 for label, rate in rates.items() if label.startswith("other")), rates
    assert rates["lookup-4"] > 0  # the prompt repeats itself


def test_greedy_with_repetition_penalty_matches(models):
    # the penalty must count accepted drafts as generated, row by row inside a verified block
    target, same, other = models("llama-gqa-untied"), models("llama-gqa-untied"), models("gpt2")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, repetition_penalty=1.3)
    expected = list(generate_tokens(target, PROMPT, params))
    for proposer in (PromptLookupProposer(3, 5), DraftModelProposer(same, 4), DraftModelProposer(other, 3)):
        assert run(target, proposer, params)[0] == expected
    assert run(target, DraftModelProposer(same, 4), params)[1].extra["spec"]["acceptance_rate"] == 1.0


def test_one_token_prompt_and_a_draft_with_a_larger_vocabulary(models):
    target, same = models("llama-gqa-untied"), models("llama-gqa-untied")
    expected = list(generate_tokens(target, [7], GREEDY))
    for proposer in (PromptLookupProposer(3, 4), DraftModelProposer(same, 4)):
        assert run(target, proposer, prompt=[7])[0] == expected
    # a padded draft vocabulary: ids >= 320 are never fed to the target, and rejected
    wide = tiny_model("llama-gqa-untied", seed=3, vocab_size=400)
    got, stats = run(target, DraftModelProposer(wide, 3))
    assert got == list(generate_tokens(target, PROMPT, GREEDY)) and stats.extra["spec"]["proposed"] > 0
    sampled = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=1)
    assert len(run(target, DraftModelProposer(wide, 3), sampled)[0]) == 30


# --- limits: max_tokens, context, EOS ----------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 6, 11])
def test_max_tokens_exact_when_a_block_would_overshoot(max_tokens, models):
    target, same = models("llama-gqa-untied"), models("llama-gqa-untied")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    expected = list(generate_tokens(target, PROMPT, params))
    got, stats = run(target, DraftModelProposer(same, k=4), params)  # blocks of 5 tokens
    assert got == expected and len(got) == max_tokens
    assert stats.completion_tokens == max_tokens and stats.finish_reason == "length"
    got, _ = run(target, PromptLookupProposer(3, 4), params)
    assert got == expected


def test_context_limit_exact(models):
    target, same = models("llama-gqa-untied"), models("llama-gqa-untied")
    prompt = (PROMPT * 40)[: target.max_seq_len - 7]  # room for exactly 7 new tokens
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    expected = list(generate_tokens(target, prompt, params))
    assert len(expected) == 7
    for proposer in (DraftModelProposer(same, k=5), PromptLookupProposer(3, 5)):
        got, stats = run(target, proposer, params, prompt=prompt)
        assert got == expected and stats.finish_reason == "length"


def test_eos_inside_an_accepted_block(models):
    target, same = models("llama-gqa-untied"), models("llama-gqa-untied")
    params = SamplingParams(temperature=0, max_tokens=40)
    full = list(generate_tokens(target, PROMPT, params))
    eos = full[9]  # pick a token the model does produce
    cut = full.index(eos)
    got, stats = run(target, DraftModelProposer(same, k=6), params, eos=(eos,))
    assert got == full[:cut] and stats.finish_reason == "stop" and stats.completion_tokens == cut
    ignoring = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert run(target, DraftModelProposer(same, k=6), ignoring, eos=(eos,))[0] == full


# --- prompt lookup -------------------------------------------------------------------------------------

@pytest.mark.parametrize("history, max_ngram, k, expected", [
    ([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 3, [4, 5, 9]),
    ([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 2, [4, 5]),
    ([1, 2, 3, 4, 5, 9, 1, 2, 3], 3, 9, [4, 5, 9, 1, 2, 3, 4, 5, 9]),  # copies on with the same period
    ([3, 8, 1, 2, 3, 9, 2, 3], 3, 2, [9, 2]),  # "1 2 3" misses, "2 3" hits (latest occurrence wins)
    ([3, 8, 2, 6, 1, 5, 7, 3], 3, 2, [8, 2]),  # only the unigram "3" matches
    ([7, 8, 7, 8, 7], 3, 4, [8, 7, 8, 7]),
    ([4, 4, 4], 3, 3, [4, 4, 4]),
    ([1, 2, 3, 4], 3, 3, []),  # nothing repeats: no proposal
    ([6], 3, 3, []),
])
def test_prompt_lookup_proposes_the_continuation(history, max_ngram, k, expected):
    assert PromptLookupProposer(max_ngram=max_ngram, num_speculative=k).propose(history, 99).tokens == expected


def test_prompt_lookup_respects_limit_and_min_ngram():
    history = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert PromptLookupProposer(3, 5).propose(history, 2).tokens == [4, 5]
    assert PromptLookupProposer(3, 5).propose(history, 0).tokens == []
    # with bigrams at least, a lone repeated token is not enough
    assert PromptLookupProposer(3, 3, min_ngram=2).propose([3, 8, 2, 6, 1, 5, 7, 3], 9).tokens == []


# --- sampling: the output law is the target's ------------------------------------------------------------

def chi2_ok(samples: list[int], probs: torch.Tensor, z: float = 3.7) -> tuple[bool, float, float]:
    """Pearson chi-square of samples against probs; bins expecting < 5 are pooled.

    Threshold: the Wilson–Hilferty quantile at z (3.7 ≈ p 1e-4); seeded, so never flaky.
    """
    n = len(samples)
    counts = torch.bincount(torch.tensor(samples), minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):  # a zero-probability outcome happened
        return False, math.inf, 0.0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    threshold = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < threshold, stat, threshold


def test_filtered_probs_is_what_sample_draws_from():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 2
    history = torch.tensor([3, 3, 7, 11])
    params = SamplingParams(temperature=0.7, top_k=12, top_p=0.9, min_p=0.02, repetition_penalty=1.4)
    probs = filtered_probs(logits, params, history)
    assert torch.allclose(probs.sum(), torch.tensor(1.0)) and int((probs > 0).sum()) <= 12
    g = make_generator(1)
    draws = sample(logits.expand(20000, -1), params, g, history).tolist()
    ok, stat, thr = chi2_ok(draws, probs)
    assert ok, (stat, thr)
    greedy = SamplingParams(temperature=0, repetition_penalty=1.4)
    one_hot = filtered_probs(logits, greedy, history)
    assert one_hot.sum() == 1 and int(one_hot.argmax()) == int(sample(logits, greedy, None, history))
    batch = torch.randn(3, 40)
    assert torch.equal(filtered_probs(batch, params), torch.stack([filtered_probs(r, params) for r in batch]))


def _random_dists(rows: int, vocab: int, seed: int, sharp: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(rows, vocab, generator=g) * sharp, dim=-1)
    probs[:, -1] = 0.0  # a token the target never emits: must never come out
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("draft_kind", ["sampled", "one-hot"])
def test_rejection_sampling_keeps_the_target_law(draft_kind):
    vocab, k, n = 8, 3, 5000
    p = _random_dists(k + 1, vocab, seed=0)
    q = _random_dists(k, vocab, seed=1, sharp=2.5)
    q[:, -1] += 0.2  # the draft likes a token the target forbids
    q = q / q.sum(-1, keepdim=True)
    g = make_generator(123)
    if draft_kind == "sampled":  # a draft model: d_i ~ q_i
        all_drafts = torch.multinomial(q, n, replacement=True, generator=g).T.tolist()  # (n, k)
    else:  # prompt lookup: a fixed guess, q one-hot
        all_drafts, q = [[1, 4, 2]] * n, None
    first, second, accepted = [], [], 0
    for drafts in all_drafts:
        out = verify_proposal(p, drafts, q, greedy=False, generator=g)
        accepted += len(out) - 1
        first.append(out[0])
        if len(out) > 1:  # the first draft was accepted: the next token again follows the target
            second.append(out[1])
    for samples, row in ((first, p[0]), (second, p[1])):
        ok, stat, thr = chi2_ok(samples, row)
        assert ok, (draft_kind, stat, thr)
    assert 0 < accepted < k * n  # both branches of the rule ran
    # the test has power: the draft's own law (or always taking the guess) is far off
    wrong = q[0] if q is not None else torch.nn.functional.one_hot(torch.tensor(1), vocab).float() * 0.9 + 0.1 / vocab
    ok, stat, thr = chi2_ok(first, wrong)
    assert stat > 10 * thr


def test_rejection_sampling_edge_cases():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    g = make_generator(0)
    assert verify_proposal(p, [1], None, greedy=False, generator=g)[0] == 1  # p = 1: always accepted
    assert all(verify_proposal(p, [0], None, greedy=False, generator=g) == [1] for _ in range(50))
    assert all(verify_proposal(p, [2], None, greedy=False, generator=g) == [1] for _ in range(50))  # p = 0
    # q == p: never rejected
    q = torch.tensor([[0.2, 0.3, 0.5]])
    pp = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    assert all(len(verify_proposal(pp, [draw(q[0], g)], q, greedy=False, generator=g)) == 2 for _ in range(50))
    # greedy: accept while equal to the argmax, then the argmax
    logits = torch.tensor([[0.0, 5, 1], [3, 0, 1], [0, 0, 9]])
    assert verify_proposal(logits, [1, 2], None, greedy=True, generator=None) == [1, 0]
    assert verify_proposal(logits, [1, 0], None, greedy=True, generator=None) == [1, 0, 2]
    assert verify_proposal(logits, [], None, greedy=True, generator=None) == [1]


class Bigram(nn.Module):
    """A mock CausalLM whose next-token logits depend on the last token only: exact laws are enumerable."""

    def __init__(self, table: torch.Tensor, max_seq_len: int = 64):
        super().__init__()
        self.lm_head = nn.Linear(1, table.shape[0], bias=False)
        self.table = table
        self.max_seq_len, self.cache_len = max_seq_len, 0
        self.calls = 0
        self.device = table.device  # what CausalLM offers the engine

    def setup_cache(self, batch: int, max_seq_len: int | None = None, dtype=None) -> None:
        self.cache_len = min(max_seq_len or self.max_seq_len, self.max_seq_len)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        assert start_pos + input_ids.shape[1] <= self.cache_len  # never writes past the cache
        self.calls += 1
        ids = input_ids[:, -1:] if last_only else input_ids
        return self.table[ids]


def exact_law(table: torch.Tensor, prompt: list[int], params: SamplingParams, length: int,
              penalise_generated: bool = True) -> dict:
    """Probability of every continuation of ``length`` tokens under plain sampling
    (``penalise_generated=False``: the bug where the penalty sees the prompt only)."""
    law = {}
    for seq in itertools.product(range(table.shape[0]), repeat=length):
        prob, history = 1.0, list(prompt)
        for tok in seq:
            seen = history if penalise_generated else prompt
            prob *= float(filtered_probs(table[history[-1]], params, seen)[tok])
            history.append(tok)
        if prob > 0:
            law[seq] = prob
    return law


@pytest.mark.parametrize("proposer_kind", ["draft", "wide-draft", "lookup"])
def test_end_to_end_law_of_sampled_continuations(proposer_kind):
    # three-token continuations of a fixed context, with a strong penalty and filters on, against
    # the exact law of plain sampling computed from filtered_probs
    vocab, length, n = 4, 3, 800
    g = torch.Generator().manual_seed(5)
    target = Bigram(torch.randn(vocab, vocab, generator=g) * 1.5)
    draft = Bigram(torch.randn(vocab, vocab, generator=g) * 1.5)
    if proposer_kind == "wide-draft":  # two ids the target lacks, which the draft likes
        draft = Bigram(torch.cat([torch.cat([draft.table, torch.ones(vocab, 2)], 1), torch.randn(2, vocab + 2)]))
    params = SamplingParams(temperature=0.9, top_k=3, top_p=1.0, min_p=0.02, repetition_penalty=2.0,
                            max_tokens=length, ignore_eos=True)
    prompt = [2, 1, 3, 1, 2]  # 0, the favourite, is unseen: its penalty depends on what was generated
    law = exact_law(target.table, prompt, params, length)
    outcomes = sorted(law)
    index = {s: i for i, s in enumerate(outcomes)}
    gen = make_generator(9)
    samples, proposed, accepted = [], 0, 0
    for _ in range(n):
        proposer = PromptLookupProposer(2, 2) if proposer_kind == "lookup" else DraftModelProposer(draft, k=2)
        stats = GenerationStats()
        out = tuple(speculative_generate_tokens(target, prompt, params, proposer, generator=gen, stats=stats))
        assert out in index, out  # a zero-probability continuation would be a bug
        samples.append(index[out])
        proposed += stats.extra["spec"]["proposed"]
        accepted += stats.extra["spec"]["accepted"]
    ok, stat, thr = chi2_ok(samples, torch.tensor([law[s] for s in outcomes]))
    assert ok, (stat, thr)
    assert 0 < accepted < proposed  # both branches of the rule ran
    # power: forgetting to penalise generated tokens would have been caught
    wrong = exact_law(target.table, prompt, params, length, penalise_generated=False)
    assert chi2_ok(samples, torch.tensor([wrong.get(s, 0.0) for s in outcomes]))[1] > 10 * thr


def test_same_seed_same_output(models):
    target, other = models("llama-gqa-untied"), models("gpt2")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=40, ignore_eos=True, seed=11)
    for make in (lambda: DraftModelProposer(other, k=3), lambda: PromptLookupProposer(3, 4)):
        a, stats = run(target, make(), params)
        b, _ = run(target, make(), params)
        c, _ = run(target, make(), dataclasses.replace(params, seed=12))
        assert a == b and a != c and len(a) == 40
        assert stats.extra["spec"]["proposed"] > 0


def test_no_proposal_falls_back_to_one_token_per_forward():
    target = Bigram(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))

    class Silent:
        def reset(self, prompt_ids, max_len):
            pass

        def propose(self, history, limit, params, generator):
            return Proposal([])

    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    got, stats = run(target, Silent(), params, prompt=[1, 2])
    assert got == list(generate_tokens(target, [1, 2], params))
    assert stats.extra["spec"] == {"proposed": 0, "accepted": 0, "acceptance_rate": 0.0, "target_forwards": 9}
