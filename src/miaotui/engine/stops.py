"""Stop strings on streamed text: cut before the first match, never emit half of one."""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Feed text deltas; get back the text safe to emit and whether a stop string was hit.

    Text is cut exactly before the first stop string seen (it and anything after are dropped).
    A trailing piece that could still grow into a stop string is held back until it can't:

        >>> sc = StopChecker(["</s>"])
        >>> sc.feed("Hi </"), sc.feed("s> more")
        (('Hi ', False), ('', True))
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)  # "" would match everywhere
        self.matched: str | None = None  # the stop string that ended the text, if any
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return ``(text_safe_to_emit, stopped)``; after a stop, every call returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        buf = self._held + delta
        # earliest completed match wins; generation ends here, so no later text can move it
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda h: h[0])
            self._held = ""
            return buf[:cut], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason (EOS, length)."""
        out, self._held = self._held, ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        # longest suffix of buf that is a proper prefix of some stop string
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
