"""Benchmark prompts: real text (a user file, or the shared WikiText excerpt), cut to exact token counts."""

from __future__ import annotations

import os
from pathlib import Path

_FALLBACK = (
    "The history of computing is a story of people building machines to think faster than they could by "
    "hand, from the abacus and mechanical calculators to stored-program computers and modern processors. "
)


def default_data_file() -> Path | None:
    """The shared WikiText excerpt: ``$MIAOTUI_DATA_DIR``, else a ``shared/data`` beside any parent folder of
    this checkout (the project's layout), else the workspace's ``/work/shared/data``."""
    name = "wikitext2-test-excerpt.txt"
    dirs = [Path(os.environ["MIAOTUI_DATA_DIR"])] if os.environ.get("MIAOTUI_DATA_DIR") else []
    dirs += [parent / "shared" / "data" for parent in Path(__file__).resolve().parents]
    dirs.append(Path("/work/shared/data"))
    return next((d / name for d in dirs if (d / name).is_file()), None)


def prompt_ids(tokenizer, n_tokens: int, data: str | Path | None = None) -> list[int]:
    """Exactly ``n_tokens`` ids of real text (repeated if the text is shorter)."""
    path = Path(data) if data else default_data_file()
    text = path.read_text() if path else _FALLBACK
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"{path}: no text to build prompts from")
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids[:n_tokens]
