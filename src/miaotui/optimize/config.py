"""What one ``optimize`` run is told: a typed dataclass shared by the library call and the CLI."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from miaotui.errors import MiaotuiError

DEFAULT_TIME_LIMIT = 30 * 60.0
# decoders: decode, prefill, throughput (tok/s), memory; encoders: throughput (texts/s), latency, memory
OBJECTIVES = ("decode", "prefill", "throughput", "memory", "latency")
# decoders: all but "dtype"; encoders: dtype (bf16), uniform (int8/int4 weight-only), calibrated (W8A8),
# mixed (W8A8 with sensitive layers float), prune (heads, layers), distill ("groups", "lowrank": decoders only)
FAMILIES = ("dtype", "uniform", "groups", "mixed", "calibrated", "prune", "lowrank", "distill")


class OptimizeError(MiaotuiError):
    """Bad input to ``optimize`` (a duration, a folder, a model it cannot search)."""


_DURATION = re.compile(r"(?P<n>[0-9]*\.?[0-9]+)\s*(?P<unit>h|m|min|s|sec)?", re.IGNORECASE)


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h``, ``1h30m`` or ``1.5h``."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        pos, seconds = 0, 0.0
        while pos < len(s):
            m = _DURATION.match(s, pos)
            if not m or m.end() == pos:
                raise OptimizeError(f"time limit {text!r} does not parse (e.g. 90s, 30m, 1h, 1h30m)")
            unit = (m["unit"] or "s")[0]
            seconds += float(m["n"]) * {"h": 3600, "m": 60, "s": 1}[unit]
            pos = m.end()
        if not s:
            raise OptimizeError("empty time limit (e.g. 90s, 30m, 1h)")
    if seconds <= 0:
        raise OptimizeError(f"the time limit must be positive, got {text!r}")
    return seconds


@dataclass
class OptimizeConfig:
    model: str | None  # source: HF folder, GGUF file, encoder folder (None: the default model for the budget)
    budget: str
    output: Path
    objective: str | None = None  # None: "decode" for decoders, "throughput" for encoders
    time_limit: float = DEFAULT_TIME_LIMIT  # seconds, everything included
    data: str | None = None  # evaluation text (default: the WikiText excerpt)
    resume: bool = True  # reuse the results cached in ``output``
    ctx: int = 512
    search_windows: int = 4
    heldout_windows: int = 4
    sensitivity_windows: int = 2
    # encoders: paragraphs of the data (None: up to 64 / 32 / 32, or 2/3, 1/3 and 1/2 of a shorter text)
    search_texts: int | None = None
    heldout_texts: int | None = None
    sensitivity_texts: int | None = None
    max_candidates: int | None = None  # stop after this many measured candidates (cached ones count)
    families: tuple[str, ...] = FAMILIES
    calib: str | None = None
    calib_samples: int | None = None
    calib_len: int | None = None
    seed: int = 0
    compile: bool = False
    decode_tokens: int = 48
    repeats: int = 3
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise OptimizeError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise OptimizeError(f"unknown candidate families {', '.join(sorted(unknown))} "
                                f"(choose from {', '.join(FAMILIES)})")
        self.time_limit = parse_duration(self.time_limit)
        if self.max_candidates is not None and self.max_candidates < 1:
            raise OptimizeError(f"max candidates must be at least 1, got {self.max_candidates}")
        if self.ctx < 8:
            raise OptimizeError(f"ctx must be at least 8 tokens, got {self.ctx}")
        for name in ("search_texts", "heldout_texts", "sensitivity_texts"):
            n = getattr(self, name)
            if n is not None and n < 2:  # a similarity rank correlation needs pairs
                raise OptimizeError(f"{name.replace('_', ' ')} must be at least 2, got {n}")
