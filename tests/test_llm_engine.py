"""The continuous-batching engine on tiny random models: its outputs must equal the plain single-sequence loop.

Requests join mid-run, leave early (EOS, max_tokens, abort), get split into prompt chunks, lose their blocks
to preemption or start from prefix-cache hits; none of it may change a single token.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import ARCHS
from miaotui.config import SamplingParams
from miaotui.engine.engine_config import CacheConfig, EngineConfig
from miaotui.engine.generate import generate_tokens
from miaotui.engine.llm_engine import LLMEngine, offline_config, resolve_config
from miaotui.engine.paged_cache import lazy_zeros
from miaotui.errors import MiaotuiError, PromptTooLongError
from miaotui.loading import build_model
from miaotui.loading.hf import load_hf_weights, read_hf_config
from miaotui.models.base import KVCache

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU cannot stall a thread team."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(hf_folder):
    """name → our model built from the tiny HF folder (once per module)."""
    built = {}

    def get(name: str):
        if name not in built:
            path, _ = hf_folder(name)
            built[name] = build_model(read_hf_config(path), load_hf_weights(path, torch.float32), torch.float32)
        return built[name]

    return get


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def reference(model, prompt: list[int], params: SamplingParams, eos=()) -> list[int]:
    return list(generate_tokens(model, prompt, params, eos))


def drive(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
          aborts: dict[int, list[str]] | None = None, max_steps: int = 2000):
    """Step to completion, adding / aborting requests before the given steps → id → (tokens, reason)."""
    aborts = aborts or {}
    streamed: dict[str, list[int]] = {}
    results: dict[str, tuple[list[int], str]] = {}
    for step in range(max_steps):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
            streamed[rid] = []
        for rid in aborts.get(step, []):
            if engine.abort(rid):
                results[rid] = (streamed[rid], "abort")
        if not engine.has_unfinished() and step > max(arrivals, default=0):
            break
        for o in engine.step():
            streamed[o.request_id].extend(o.new_token_ids)
            if o.finished:
                results[o.request_id] = (streamed[o.request_id], o.finish_reason)
        engine.scheduler.check_invariants()
    else:
        raise AssertionError("the engine did not finish")
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every block came back
    return results


CONFIGS = {
    "ample": EngineConfig(max_num_seqs=8, max_num_batched_tokens=256),
    # prompts of up to 40 tokens in chunks of at most 8, next to running decodes
    "chunked": EngineConfig(max_num_seqs=4, max_num_batched_tokens=8, cache=CacheConfig(block_size=4)),
    # 20 blocks × 4 slots: the longest request alone needs 17, so requests preempt each other
    "preempt": EngineConfig(max_num_seqs=6, max_num_batched_tokens=32,
                            cache=CacheConfig(block_size=4, num_blocks=20, enable_prefix_caching=False)),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_greedy_batch_equals_single_sequence(name, config, tiny):
    model = tiny(name)
    rng = random.Random(name)
    reqs = {f"r{i}": ([rng.randrange(1, 300) for _ in range(rng.randint(1, 40))], rng.randint(1, 28))
            for i in range(8)}
    # an EOS the model really emits (4th token of r0's free run), so some request finishes with "stop"
    eos = {reference(model, reqs["r0"][0], greedy(reqs["r0"][1], ignore_eos=True))[:4][-1]}
    arrivals = {0: ["r0", "r1", "r2", "r3"], 3: ["r4", "r5"], 7: ["r6"], 12: ["r7"]}  # some join mid-run
    params = {rid: greedy(max_tokens) for rid, (_, max_tokens) in reqs.items()}
    params["r2"] = params["r6"] = greedy(28, ignore_eos=True)  # still running when aborted
    arrivals = {s: [(rid, reqs[rid][0], params[rid]) for rid in rids] for s, rids in arrivals.items()}
    engine = LLMEngine(model, eos, CONFIGS[config])
    results = drive(engine, arrivals, aborts={5: ["r2"], 9: ["r6"]})
    for rid, (prompt, _) in reqs.items():
        max_tokens = params[rid].max_tokens
        want = reference(model, prompt, params[rid], eos)
        tokens, reason = results[rid]
        if reason == "abort":
            assert tokens == want[:len(tokens)], rid
        else:
            assert tokens == want, rid
            assert reason == ("length" if len(want) == max_tokens else "stop"), rid
    assert results["r2"][1] == results["r6"][1] == "abort"
    assert any(reason == "stop" for _, reason in results.values())
    if config == "preempt":
        assert engine.stats.num_preemptions > 0


def test_generate_helper_and_single_path_after_it(tiny):
    model = tiny("llama-gqa-untied")
    prompts = [[5, 17, 42], list(range(1, 30)), [250] * 9]
    params = [greedy(12, ignore_eos=True), greedy(5, ignore_eos=True), greedy(20, ignore_eos=True)]
    engine = LLMEngine(model, config=EngineConfig(max_num_batched_tokens=16, max_num_seqs=4))
    assert engine.generate(prompts, params) == [reference(model, p, sp) for p, sp in zip(prompts, params)]
    # the paged caches were only lent to the model: its own attention layers have no cache left behind
    assert all(layer.kv_cache is None or isinstance(layer.kv_cache, KVCache) for layer in model.attention_layers())
    assert not engine.has_unfinished()
    with pytest.raises(MiaotuiError, match="sampling parameter sets"):
        engine.generate(prompts, params[:2])


@pytest.mark.parametrize("name", ["llama-gqa-untied", "mistral-sliding", "gpt2"])
def test_prefix_caching_on_and_off_give_the_same_tokens_and_hits_skip_compute(name, tiny):
    model = tiny(name)
    rng = random.Random(7)
    system = [rng.randrange(1, 300) for _ in range(21)]  # 5 full blocks of 4 and a bit
    prompts = {f"r{i}": system + [rng.randrange(1, 300) for _ in range(rng.randint(1, 9))] for i in range(5)}
    prompts["same"] = list(prompts["r0"])  # an exact repeat: everything but its last token is cached
    arrivals = {0: ["r0"], 2: ["r1", "r2"], 4: ["r3", "same"], 6: ["r4"]}
    arrivals = {s: [(rid, prompts[rid], greedy(10, ignore_eos=True)) for rid in rids] for s, rids in arrivals.items()}
    runs = {}
    for prefix in (True, False):
        cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64,
                           cache=CacheConfig(block_size=4, num_blocks=64, enable_prefix_caching=prefix))
        engine = LLMEngine(model, (), cfg)
        runs[prefix] = (drive(engine, arrivals), engine)
    (on, engine_on), (off, engine_off) = runs[True], runs[False]
    assert on == off == {rid: (reference(model, p, greedy(10, ignore_eos=True)), "length")
                         for rid, p in prompts.items()}
    hits = engine_on.scheduler.block_manager.prefix_cache.num_hit_blocks
    assert hits >= 5 * 5  # the system prompt's 5 blocks, for every later request
    # the hit blocks were never run through the model again
    skipped = engine_off.stats.num_computed_tokens - engine_on.stats.num_computed_tokens
    assert skipped == hits * 4


def test_a_prefix_hit_starts_computing_past_the_cached_blocks(tiny):
    model = tiny("llama-gqa-untied")
    engine = LLMEngine(model, (), EngineConfig(cache=CacheConfig(block_size=4)))
    prompt = list(range(10, 30))  # 20 tokens: 5 full blocks
    engine.add_request("a", prompt, greedy(3, ignore_eos=True))
    engine.step()
    engine.add_request("b", prompt + [7, 8], greedy(3, ignore_eos=True))
    out = engine.scheduler.schedule()
    [b] = [s for s in out.scheduled if s.request_id == "b"]
    assert (b.start_pos, b.num_tokens) == (20, 2)  # only the two new tokens run
    assert engine.get_request("b").num_cached_tokens == 20
    engine.scheduler.update(out, {s.request_id: [1] for s in out.scheduled if s.sample})


def test_each_request_samples_with_its_own_params_and_seed(tiny):
    model = tiny("qwen2-bias")
    prompts = [[5, 17, 42, 99], [3, 1, 4, 1, 5, 9, 2, 6], [250, 12], list(range(40, 60)), [8, 8, 8]]
    params = [
        SamplingParams(temperature=0.9, seed=1, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=1.2, top_k=20, top_p=0.9, seed=2, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=18, ignore_eos=True),
        SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=1.2, seed=3, max_tokens=22, ignore_eos=True),
    ]
    engine = LLMEngine(model, (), EngineConfig(max_num_batched_tokens=16, max_num_seqs=5))
    got = engine.generate(prompts, params)
    assert got == [reference(model, p, sp) for p, sp in zip(prompts, params)]
    # the seed matters: another seed gives another sample
    other = engine.generate([prompts[0]], [SamplingParams(temperature=0.9, seed=11, max_tokens=20, ignore_eos=True)])
    assert other[0] != got[0]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_paged_logits_equal_static_cache_logits_in_a_mixed_step(name, tiny):
    model = tiny(name)
    engine = LLMEngine(model, (), EngineConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                               cache=CacheConfig(block_size=4)))
    rng = random.Random(3)
    tokens = {"a": [rng.randrange(1, 300) for _ in range(19)], "b": [rng.randrange(1, 300) for _ in range(6)]}
    for rid in tokens:
        engine.add_request(rid, tokens[rid], greedy(30, ignore_eos=True))
    for _ in range(4):  # a and b prefill, then decode
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    tokens["c"] = [rng.randrange(1, 300) for _ in range(25)]  # longer than the window of 16
    engine.add_request("c", tokens["c"], greedy(5, ignore_eos=True))
    for o in engine.step():  # c's first chunk (14 tokens, no sample) next to two decodes
        tokens[o.request_id] += o.new_token_ids
    out = engine.scheduler.schedule()
    kinds = {s.request_id: (s.start_pos, s.num_tokens, s.sample) for s in out.scheduled}
    assert kinds["a"][1:] == kinds["b"][1:] == (1, True) and kinds["c"] == (14, 11, True)
    ids, logits = engine.execute(out)
    assert sorted(ids) == ["a", "b", "c"]
    with torch.no_grad():
        for rid, row in zip(ids, logits):
            seq = torch.tensor([tokens[rid][:kinds[rid][0] + kinds[rid][1]]])
            model.setup_cache(batch=1, max_seq_len=64)  # static cache: prefill, then the last token
            model(seq[:, :-1], 0)
            want = model(seq[:, -1:], seq.shape[1] - 1)[0, -1]
            torch.testing.assert_close(row, want, atol=1e-4, rtol=0)
    model.clear_cache()
    engine.scheduler.update(out, {rid: [int(row.argmax())] for rid, row in zip(ids, logits)})


def test_cache_is_sized_from_the_config(tiny):
    model = tiny("llama-gqa-untied")  # 2 layers, 2 KV heads of 16: 512 bytes per token in fp32
    cfg = resolve_config(EngineConfig(max_model_len=4096, max_num_seqs=3), model)
    assert cfg.max_model_len == 512  # clamped to the model's context
    assert cfg.cache.num_blocks == 3 * 512 // 16
    small = EngineConfig(max_num_seqs=3, cache=CacheConfig(memory_budget_gib=16 * 16 * 512 / 2**30))
    assert resolve_config(small, model).cache.num_blocks == 16  # capped by the budget
    assert resolve_config(EngineConfig(cache=CacheConfig(num_blocks=7)), model).cache.num_blocks == 7
    engine = LLMEngine(model, (), small)
    assert engine.kv.nbytes == 16 * 16 * 512
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        engine.add_request("big", list(range(1, 500)), greedy(12))
    with pytest.raises(PromptTooLongError, match="context"):
        engine.add_request("ctx", list(range(600)), greedy(1))
    assert not engine.abort("big")


def test_offline_batches_get_just_the_blocks_they_need(tiny):
    model = tiny("llama-gqa-untied")  # 512-token context, 16-slot blocks
    cfg = offline_config(model, [10, 16, 17, 900], enable_prefix_caching=False)
    assert cfg.cache.num_blocks == 1 + 1 + 2 + 32  # the last request clamped to the 512-token context
    assert cfg.max_model_len == 512 and cfg.max_num_seqs == 4 and not cfg.cache.enable_prefix_caching
    assert cfg.max_num_batched_tokens >= 4


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_lazy_zeros_are_zeros_and_resident_only_where_written():
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        z = lazy_zeros((33, 3, 8), dtype)
        assert z.shape == (33, 3, 8) and z.dtype == dtype and z.is_contiguous()
        assert z.data_ptr() % 64 == 0 and not z.any()
        z[5] = 1  # writable
        assert int(z.sum()) == 24
    if not __import__("os").path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc to read the resident size")
    before = _rss_mib()
    pool = lazy_zeros((64 * 2**20,), torch.float32)  # 256 MiB, none of it touched
    assert float(pool[::4096].sum()) == 0.0  # reading maps the shared zero page, not new memory
    assert _rss_mib() - before < 32
    pool[: 16 * 2**20].fill_(1.0)  # 64 MiB written
    assert _rss_mib() - before > 48
    del pool  # unmapped: the memory goes back to the OS
    assert _rss_mib() - before < 32


def test_llm_generate_list_equals_one_prompt_at_a_time(hf_folder):
    from miaotui.llm import LLM

    path, _ = hf_folder("llama-gqa-untied")
    llm = LLM(str(path))
    prompts = ["The capital of France is", "Hello world", [{"role": "user", "content": "hi"}],
               "Once upon a time", "秒推"]
    cases = [
        SamplingParams(temperature=0, max_tokens=20),
        SamplingParams(temperature=0.9, seed=3, max_tokens=30, stop=("e", "ll")),
        [SamplingParams(temperature=0, max_tokens=25, stop=("a",), repetition_penalty=1.3),
         SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=0.5, seed=1, max_tokens=12),
         SamplingParams(temperature=0, max_tokens=40, stop=("o", "x")), SamplingParams(temperature=0, max_tokens=9)],
    ]
    reasons = set()
    for params in cases:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        single = [llm.generate(p, sp) for p, sp in zip(prompts, plist)]
        batch = llm.generate(prompts, params)
        for a, b in zip(single, batch):
            assert b.text == a.text
            assert (b.stats.prompt_tokens, b.stats.completion_tokens, b.stats.finish_reason) == (
                a.stats.prompt_tokens, a.stats.completion_tokens, a.stats.finish_reason)
            reasons.add(a.stats.finish_reason)
    assert reasons == {"stop", "length"}  # stop strings did cut some requests short
    assert llm.generate([], SamplingParams()) == []
