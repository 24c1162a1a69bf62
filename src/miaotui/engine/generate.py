"""Single-sequence generation: prefill, then cached decode, as a generator of token ids.

The engine knows token ids only; text (detokenisation, stop strings, chat templates) lives at the edges.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from miaotui.config import GenerationStats, SamplingParams
from miaotui.engine.runner import Runner
from miaotui.engine.sampler import make_generator, sample
from miaotui.errors import MiaotuiError, PromptTooLongError
from miaotui.models import CausalLM

_CACHE_ROUND = 256  # allocate the KV cache in steps so nearby lengths reuse one allocation


def check_prompt(n_prompt: int, context: int) -> None:
    if n_prompt == 0:
        raise MiaotuiError("empty prompt: give at least one token of input")
    if n_prompt >= context:
        raise PromptTooLongError(
            f"prompt is {n_prompt} tokens but the model's context is {context} tokens "
            "(shorten the prompt; at least one position must remain for the answer)"
        )


def ensure_cache(model: CausalLM, length: int) -> None:
    """(Re)allocate a batch-1 cache when the current one is too short."""
    if model.cache_len < length:
        rounded = -(-length // _CACHE_ROUND) * _CACHE_ROUND
        model.setup_cache(batch=1, max_seq_len=min(rounded, model.max_seq_len))


def start_generation(model: CausalLM, prompt_ids: list[int], params: SamplingParams, eos_ids: Iterable[int],
                     generator: torch.Generator | None):
    """What every single-sequence decoder needs first: the prompt checked against the context, the cache
    sized, the generator, the EOS set, and a history buffer (prompt + room for every new id) that the
    repetition penalty reads. Returns ``(max_new, generator, eos, history)``."""
    n = len(prompt_ids)
    check_prompt(n, model.max_seq_len)
    max_new = min(params.max_tokens, model.max_seq_len - n)
    ensure_cache(model, n + max_new)
    generator = generator or make_generator(params.seed, model.device)  # on the logits' device (CUDA too)
    eos = frozenset(() if params.ignore_eos else eos_ids)
    history = torch.empty(n + max_new, dtype=torch.long, device=model.device)
    history[:n] = torch.tensor(prompt_ids, dtype=torch.long)
    return max_new, generator, eos, history


@torch.inference_mode()
def generate_tokens(
    model: CausalLM | Runner,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until EOS, ``max_tokens`` or the context is full.

    EOS is not yielded. ``stats`` (if given) is filled in as generation runs; ``finish_reason`` is
    ``"stop"`` for EOS and ``"length"`` otherwise (a caller that stops early, e.g. on a stop string,
    sets its own reason).
    """
    runner = model if isinstance(model, Runner) else Runner(model)
    model = runner.model
    stats = stats if stats is not None else GenerationStats()
    n = len(prompt_ids)
    max_new, generator, eos, history = start_generation(model, prompt_ids, params, eos_ids, generator)
    use_history = params.repetition_penalty != 1.0

    stats.prompt_tokens, stats.completion_tokens, stats.finish_reason = n, 0, "length"
    compile_s0 = runner.compile_s  # compilation during this call is reported apart, not as decode time
    t0 = time.perf_counter()
    logits = runner.prefill(history[:n].unsqueeze(0))[0]
    pos = n
    for i in range(max_new):
        token = int(sample(logits, params, generator, history[:pos] if use_history else None))
        now = time.perf_counter()
        if i == 0:
            stats.ttft_s, t_first = now - t0, now
        if token in eos:
            stats.finish_reason = "stop"
            return
        stats.decode_s = now - t_first - (runner.compile_s - compile_s0)  # up to the last token delivered
        stats.completion_tokens += 1
        yield token
        if i + 1 == max_new:
            return
        history[pos] = token
        logits = runner.decode(history[pos:pos + 1].unsqueeze(0), pos)[0]
        pos += 1
