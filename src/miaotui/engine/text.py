"""The text edge of generation: token stream → UTF-8-safe text deltas, cut at stop strings."""

from __future__ import annotations

from collections.abc import Iterator

from miaotui.config import GenerationStats, SamplingParams
from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.engine.generate import generate_tokens
from miaotui.engine.stops import StopChecker


class TextAssembler:
    """Token ids → text deltas for one request: UTF-8-safe detokenisation, then stop strings.

    ``add`` returns the text now safe to show and whether a stop string ended the text; ``finish``
    releases what was held back when generation ends for another reason (EOS, length).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...]):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopChecker(stop)

    def add(self, token: int) -> tuple[str, bool]:
        return self.stops.feed(self.detok.add(token))

    def finish(self) -> tuple[str, bool]:
        if self.stops.stopped:
            return "", True
        text, stopped = self.stops.feed(self.detok.flush())
        return (text if stopped else text + self.stops.flush()), stopped


def stream_text(model, tokenizer, prompt_ids: list[int], params: SamplingParams, eos_ids=(),
                stats: GenerationStats | None = None, generator=None, proposer=None) -> Iterator[str]:
    """Yield text deltas as tokens arrive; a stop string ends generation and is not emitted.

    ``proposer`` (a ``speculative.Proposer``): decode speculatively with it (same output law, fewer
    forwards of ``model``); ``model`` may then be a ``Runner``, whose eager model verifies the drafts."""
    stats = stats if stats is not None else GenerationStats()
    text_out = TextAssembler(tokenizer, prompt_ids, params.stop)
    if proposer is not None:
        from miaotui.engine.speculative import speculative_generate_tokens

        target = getattr(model, "model", model)  # a Runner → its model: verification is a multi-token forward
        tokens = speculative_generate_tokens(target, prompt_ids, params, proposer, eos_ids, generator, stats)
    else:
        tokens = generate_tokens(model, prompt_ids, params, eos_ids, generator, stats)
    try:
        for token in tokens:
            text, stopped = text_out.add(token)
            if text:
                yield text
            if stopped:
                stats.finish_reason = "stop"
                return
        text, stopped = text_out.finish()
        if stopped:
            stats.finish_reason = "stop"
        if text:
            yield text
    finally:
        tokens.close()
