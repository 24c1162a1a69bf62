"""Tokenizers (Hugging Face ``tokenizers`` via transformers) and chat templates, at the edges of the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miaotui.errors import MiaotuiError, ModelLoadError


def load_hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # transformers raises a variety of types for a missing/broken tokenizer
        raise ModelLoadError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


def encode(tokenizer, text: str) -> list[int]:
    """Plain-text prompt → ids, with the special tokens (e.g. BOS) the tokenizer is configured to add."""
    return list(tokenizer(text).input_ids)


def render_chat(tokenizer, messages: list[dict[str, Any]]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise MiaotuiError("this model has no chat template; use plain generation without --chat")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Chat messages → ids of the templated prompt, ending where the assistant's answer starts."""
    # the template writes its own BOS/special tokens, so the tokenizer must not add them again
    return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False).input_ids)
