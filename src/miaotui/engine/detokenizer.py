"""Streaming detokenization: turn token ids into text deltas one token at a time.

Decoding each token alone is wrong in two ways: a multi-byte UTF-8 character may span several
byte-level / byte-fallback tokens, and SentencePiece decoders strip the leading "▁" space of
the first token they see. So we decode a short window of recent tokens twice — up to the last
emitted token (``prefix``) and up to the newest — and emit the difference once it no longer
ends in an incomplete character (U+FFFD). Worked example, byte-level BPE, "你" = e4 bd a0:

    add(tok[e4 bd])  window decodes to "\\ufffd"      → hold, return ""
    add(tok[a0])     window decodes to "你"           → return "你", window slides forward
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded before the first new one, so its leading space survives


class IncrementalDetokenizer:
    """Concatenated ``add`` results plus ``flush()`` equal ``tokenizer.decode(generated_ids)``.

    With ``prompt_ids`` they equal what decoding prompt + generated adds after the prompt's text,
    so a SentencePiece "▁word" right after the prompt keeps its space. One known difference: HF's
    ByteFallback decoder turns a whole run of <0xNN> tokens into U+FFFD if any byte in it is
    invalid; a stream has already emitted the run's valid characters by then (byte-level BPE
    replaces bad bytes one by one, so it always matches exactly).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # window of ids: [0, read) were already emitted, [read:] are held back
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:]) if prompt_ids else []
        n = len(self._ids)
        self._read, self._prefix_text = n, self._decode(self._ids)
        if self._prefix_text.endswith(_REPLACEMENT):
            # a prompt cut mid-character: hold back its (<= 3) trailing tokens so the char comes out whole
            for read in range(n - 1, max(n - 4, -1), -1):
                text = self._decode(self._ids[:read])
                if not text.endswith(_REPLACEMENT):
                    self._read, self._prefix_text = read, text
                    break
        self._pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _emit(self, final: bool) -> str:
        new_text = self._decode(self._ids)
        if len(new_text) <= len(self._prefix_text) or (not final and new_text.endswith(_REPLACEMENT)):
            return ""  # nothing yet (a skipped special token) or a character is still incomplete
        delta = new_text[len(self._prefix_text) :]
        # slide the window: the tokens just emitted become the next decode's prefix
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._pieces.append(delta)
        return delta

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Release held-back text (e.g. a trailing invalid byte as U+FFFD) at the end of generation."""
        return self._emit(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)
