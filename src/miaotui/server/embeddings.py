"""``/v1/embeddings`` at the HTTP edge: an ``EmbeddingRequest`` → token ids (or a 400 naming the parameter),
and the OpenAI response body (``float`` lists, or ``base64`` of little-endian float32) with usage counts."""

from __future__ import annotations

import base64
import warnings

import numpy as np

from miaotui.errors import MiaotuiError, PromptTooLongError
from miaotui.server.protocol import EmbeddingRequest, bad_request

MAX_INPUTS = 2048  # per request, as OpenAI's API allows


def _which(i: int, n: int, single: bool) -> str:
    return "input" if single else f"input[{i}]"


def embedding_inputs(req: EmbeddingRequest, encoder, truncate: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and token types of every input, special tokens added; over-long inputs cut to the model's
    limit (``truncate``) or refused with a 400."""
    from miaotui.encoder import TruncationWarning

    raw = req.input
    if req.dimensions is not None and req.dimensions != encoder.dim:
        raise bad_request(f"'dimensions': this model's embeddings have {encoder.dim} dimensions and cannot be "
                          f"shortened to {req.dimensions} (it was not trained for it); omit the parameter",
                          "dimensions", "unsupported_value")
    tokens = isinstance(raw, list) and bool(raw) and not isinstance(raw[0], str)
    single = isinstance(raw, str) or (tokens and isinstance(raw[0], int))
    items = [raw] if single else raw
    if not items:
        raise bad_request("'input' must not be an empty list", "input", "empty_input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"'input': at most {MAX_INPUTS} inputs per request, got {len(items)}", "input")
    for i, item in enumerate(items):
        if (isinstance(item, str) and not item.strip()) or len(item) == 0:
            raise bad_request(f"'{_which(i, len(items), single)}' must not be empty", _which(i, len(items), single),
                              "empty_input")
    try:
        with warnings.catch_warnings():  # truncation is the server's policy, not news for its log
            warnings.simplefilter("ignore", TruncationWarning)
            if tokens:
                return encoder.from_token_ids(items, truncate)
            return encoder.tokenize(items, truncate)
    except PromptTooLongError as e:
        where = _which(getattr(e, "index", 0), len(items), single)
        raise bad_request(f"'{where}' is longer than the model's limit of {encoder.max_tokens} tokens "
                          "(this server refuses over-long inputs instead of truncating them)", where,
                          "context_length_exceeded") from None
    except MiaotuiError as e:  # a token id outside the vocabulary
        raise bad_request(f"'input': {e}", "input") from None


def embedding_response(emb: np.ndarray, encoding_format: str, model: str, prompt_tokens: int) -> dict:
    def vector(v: np.ndarray):
        if encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.tolist()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": vector(v)} for i, v in enumerate(emb)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
