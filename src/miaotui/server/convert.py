"""The one place an OpenAI request becomes token ids, ``SamplingParams`` and ``OpenAIExtras``.

Every limit the engine would refuse (empty or over-long prompt, ``max_tokens`` past the context, more KV
blocks than the cache has, token ids outside the vocabulary) is checked here first, so the client hears a 400
naming the parameter instead of a failure from inside the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.config import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.loading.tokenizer import encode, render_chat
from miaotui.server.engine_loop import SeqSpec
from miaotui.server.logits import OpenAIExtras
from miaotui.server.protocol import ChatCompletionRequest, CompletionRequest, bad_request

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the whole context


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    cache_tokens: int  # token slots of the whole KV cache (num_blocks * block_size)
    block_size: int
    max_sequences: int  # running + waiting sequences the server holds


def completion_prompts(req: CompletionRequest, tokenizer, limits: Limits) -> tuple[list[list[int]], list[str]]:
    """→ (token ids per prompt, text per prompt)."""
    p = req.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        p = [p]
    if not p:
        raise bad_request("prompt must not be empty", "prompt")
    ids, texts = [], []
    for i, one in enumerate(p):
        where = "prompt" if len(p) == 1 else f"prompt[{i}]"
        if isinstance(one, str):
            if not one:
                raise bad_request("prompt must not be empty", where)
            ids.append(encode(tokenizer, one))
            texts.append(one)
        else:
            if not one:
                raise bad_request("prompt must not be empty", where)
            bad = next((t for t in one if not 0 <= t < limits.vocab_size), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})", where)
            ids.append(list(one))
            texts.append(tokenizer.decode(one))
    return ids, texts


def chat_prompt(req: ChatCompletionRequest, tokenizer) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = render_chat(tokenizer, messages)
    except MiaotuiError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # noqa: BLE001 (jinja templates raise what they like for a conversation they reject)
        raise bad_request(f"the chat template rejected these messages: {type(e).__name__}: {e}", "messages") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def max_new_tokens(n_prompt: int, asked: int | None, default: int | None, limits: Limits,
                   prompt_param: str, tokens_param: str) -> int:
    if n_prompt == 0:
        raise bad_request("the prompt is empty after tokenization", prompt_param)
    if n_prompt >= limits.max_model_len:
        raise bad_request(f"the prompt is {n_prompt} tokens but the context is {limits.max_model_len} "
                          "(at least one position must remain for the answer)", prompt_param, "context_length_exceeded")
    room = limits.max_model_len - n_prompt
    if asked is None:
        asked = room if default is None else min(default, room)
    elif asked > room:
        raise bad_request(f"{tokens_param}={asked} plus the prompt's {n_prompt} tokens exceeds the context of "
                          f"{limits.max_model_len}; at most {room}", tokens_param, "context_length_exceeded")
    # the last new token needs no KV slot (see Scheduler.add_request); round up to whole blocks
    blocks = -(-(n_prompt + asked - 1) // limits.block_size)
    if blocks * limits.block_size > limits.cache_tokens:
        raise bad_request(f"{n_prompt} prompt + {asked} new tokens do not fit the KV cache "
                          f"({limits.cache_tokens} tokens); lower {tokens_param}", tokens_param)
    return asked


def sampling(req, max_tokens: int, choice: int) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    seed = None if req.seed is None else (req.seed + choice) % 2**63  # n choices must differ, yet reproduce
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's defaults
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0), min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        seed=seed, max_tokens=max_tokens, stop=stop, ignore_eos=req.ignore_eos)


def extras(req, logprobs: int | None, limits: Limits) -> OpenAIExtras:
    bias = None
    if req.logit_bias:
        bias = {int(k): v for k, v in req.logit_bias.items()}
        bad = next((t for t in bias if t >= limits.vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})", "logit_bias")
    return OpenAIExtras(bias, req.presence_penalty, req.frequency_penalty, logprobs)


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def check_unsupported(req) -> None:
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise bad_request("suffix (insertion) is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported", "echo")


def build_specs(request_id: str, prompts: list[list[int]], req, max_tokens: list[int], ext: OpenAIExtras,
                limits: Limits) -> list[SeqSpec]:
    total = len(prompts) * req.n
    if total > limits.max_sequences:
        raise bad_request(f"{len(prompts)} prompt(s) x n={req.n} is {total} sequences; this server holds at most "
                          f"{limits.max_sequences} at once", "n")
    specs = []
    for p, (ids, mt) in enumerate(zip(prompts, max_tokens)):
        for c in range(req.n):
            index = p * req.n + c
            specs.append(SeqSpec(f"{request_id}-{index}", index, ids, sampling(req, mt, c), ext))
    return specs
