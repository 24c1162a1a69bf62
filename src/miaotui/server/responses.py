"""OpenAI response bodies for completions and chat completions, whole or as stream chunks, from ``Event``s."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from miaotui.server.engine_loop import Event
from miaotui.server.logits import TokenLogprob


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    n_tokens: int = 0
    offset: int = 0  # characters so far (completions' text_offset)
    finish_reason: str | None = None


class Reply:
    """One HTTP request's answer. ``chat``: chat.completion(.chunk), else text_completion.

    ``echo``: per choice, text to put before the answer (completions ``echo``)."""

    def __init__(self, chat: bool, request_id: str, model: str, tokenizer, n_choices: int, prompt_tokens: int,
                 logprobs: bool, echo: list[str] | None = None):
        self.chat, self.id, self.model, self.tok = chat, request_id, model, tokenizer
        self.created = int(time.time())
        self.prompt_tokens, self.want_logprobs = prompt_tokens, logprobs
        self.choices = [_Choice() for _ in range(n_choices)]
        self.echo = echo

    # ---- shared
    def add(self, ev: Event) -> _Choice:
        c = self.choices[ev.index]
        c.n_tokens += len(ev.token_ids)
        c.logprobs.extend(ev.logprobs)
        c.text.append(ev.text)
        if ev.finish_reason:
            c.finish_reason = ev.finish_reason
        return c

    def usage(self) -> dict:
        done = sum(c.n_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def _envelope(self, chunk: bool, choices: list[dict]) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _token(self, tid: int) -> str:
        return self.tok.decode([tid])

    def _logprobs(self, entries: list[TokenLogprob], c: _Choice) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            def item(tid, lp):
                s = self._token(tid)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [dict(item(t, lp), top_logprobs=[item(a, alp) for a, alp in alts])
                                for t, lp, alts in entries]}
        tokens = [self._token(t) for t, _, _ in entries]
        offsets = []
        for s in tokens:
            offsets.append(c.offset)
            c.offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self._token(a): alp for a, alp in alts} for _, _, alts in entries],
                "text_offset": offsets}

    # ---- whole
    def whole(self) -> dict:
        out = []
        for i, c in enumerate(self.choices):
            prefix = self.echo[i] if self.echo else ""
            c.offset = len(prefix)
            text = prefix + "".join(c.text)
            lp = self._logprobs(c.logprobs, c)
            if self.chat:
                out.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
            else:
                out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return dict(self._envelope(False, out), usage=self.usage())

    # ---- stream
    def first_chunks(self) -> list[dict]:
        """Chat: the assistant role for every choice; completions: the echoed prompt, if any."""
        if self.chat:
            return [self._envelope(True, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}])
                    for i in range(len(self.choices))]
        if self.echo:
            for i, e in enumerate(self.echo):
                self.choices[i].offset = len(e)
            return [self._envelope(True, [{"index": i, "text": e, "logprobs": None, "finish_reason": None}])
                    for i, e in enumerate(self.echo)]
        return []

    def chunks(self, ev: Event) -> list[dict]:
        c = self.add(ev)
        out = []
        if ev.text or ev.logprobs:
            lp = self._logprobs(ev.logprobs, c)
            body = ({"index": ev.index, "delta": {"content": ev.text}} if self.chat
                    else {"index": ev.index, "text": ev.text})
            out.append(self._envelope(True, [dict(body, logprobs=lp, finish_reason=None)]))
        if ev.finish_reason:
            body = {"index": ev.index, "delta": {}} if self.chat else {"index": ev.index, "text": ""}
            out.append(self._envelope(True, [dict(body, logprobs=None, finish_reason=ev.finish_reason)]))
        return out

    def usage_chunk(self) -> dict:
        return dict(self._envelope(True, []), usage=self.usage())
