"""The text edge of generation: token stream → UTF-8-safe text deltas, cut at stop strings."""

from __future__ import annotations

from collections.abc import Iterator

from miaotui.config import GenerationStats, SamplingParams
from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.engine.generate import generate_tokens
from miaotui.engine.stops import StopChecker


def stream_text(model, tokenizer, prompt_ids: list[int], params: SamplingParams, eos_ids=(),
                stats: GenerationStats | None = None, generator=None) -> Iterator[str]:
    """Yield text deltas as tokens arrive; a stop string ends generation and is not emitted."""
    stats = stats if stats is not None else GenerationStats()
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    stops = StopChecker(params.stop)
    tokens = generate_tokens(model, prompt_ids, params, eos_ids, generator, stats)
    try:
        for token in tokens:
            text, stopped = stops.feed(detok.add(token))
            if text:
                yield text
            if stopped:
                stats.finish_reason = "stop"
                return
        text, stopped = stops.feed(detok.flush())
        if stopped:
            stats.finish_reason = "stop"
        text += "" if stopped else stops.flush()
        if text:
            yield text
    finally:
        tokens.close()
