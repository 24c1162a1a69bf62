"""Benchmark prompts: real text (a user file, or the shared WikiText excerpt), cut to exact token counts."""

from __future__ import annotations

from pathlib import Path

_FALLBACK = (
    "The history of computing is a story of people building machines to think faster than they could by "
    "hand, from the abacus and mechanical calculators to stored-program computers and modern processors. "
)


def default_data_file() -> Path | None:
    # the repository's sibling `shared/data` when run from a checkout (tests, CI, the README's bench)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "data" / "wikitext2-test-excerpt.txt"
        if candidate.is_file():
            return candidate
    return None


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
