"""Evaluation text → token windows: the default WikiText excerpt or a user file, cut like llama.cpp does."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from miaotui.errors import MiaotuiError
from miaotui.loading.checkpoint import file_sha256


class EvalDataError(MiaotuiError):
    """An evaluation data file is missing, empty or too short for the requested windows."""


def default_data_path() -> Path:
    from miaotui.bench.prompts import default_data_file

    path = default_data_file()
    if path is None:
        raise EvalDataError("no --data given and the WikiText excerpt (shared/data) was not found; "
                            "pass --data FILE or set MIAOTUI_DATA_DIR")
    return path


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise EvalDataError(f"{path}: the file is empty")
    return text


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer prepends one by default (Llama-2 style), else None (SmolLM2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def token_windows(ids: Sequence[int] | torch.Tensor, ctx: int, n: int | None = None,
                  bos: int | None = None) -> torch.Tensor:
    """The first ``n`` (``None``/0: all) non-overlapping windows of ``ctx`` tokens → (W, ctx) int64.

    Like llama.cpp's ``perplexity``, a model whose tokenizer adds BOS gets it in place of each window's
    first token, and a trailing partial window is dropped.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ctx < 2:
        raise EvalDataError(f"--ctx must be at least 2, got {ctx}")
    total = ids.numel() // ctx
    if total == 0:
        raise EvalDataError(f"the data has {ids.numel()} tokens, fewer than one window of --ctx {ctx}")
    if n:
        if n > total:
            raise EvalDataError(f"{n} windows of {ctx} tokens asked for, but the data holds only {total} "
                                f"({ids.numel()} tokens)")
        total = n
    windows = ids[: total * ctx].view(total, ctx).clone()
    if bos is not None:
        windows[:, 0] = bos
    return windows


def text_windows(tokenizer, path: str | Path | None, ctx: int, n: int | None = None) -> tuple[torch.Tensor, str]:
    """Windows of a text file (default: the WikiText excerpt) and the file's sha256."""
    path = Path(path) if path is not None else default_data_path()
    ids = tokenize(tokenizer, read_text(path))
    return token_windows(ids, ctx, n, bos_id(tokenizer)), file_sha256(path)
