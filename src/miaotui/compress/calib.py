"""Calibration tokens for the quantizers: random windows of a user's text file or, with no file, text the
model writes itself from a fixed set of seed prompts (data-free), cached on disk.

    ids = calibration_tokens(loaded, file="wiki.txt", n_samples=64, seq_len=512)   # LongTensor (64, 512)
    ids = calibration_tokens(loaded)                                                # data-free, cached

How the tokens then flow through the model layer by layer is ``compress/layerwise.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from miaotui.errors import MiaotuiError

if TYPE_CHECKING:
    from miaotui.loading import LoadedModel

# 32 x 512 = 16k tokens, not the papers' 128 x 512: the cost (a forward of every token through each layer
# twice, plus the input Gram matrices) grows linearly with tokens: on 2 CPU cores shared with other jobs
# (load ~8) GPTQ on SmolLM2-135M took 25-75 s per layer with 16k tokens, ~11 min in all with 8k. 16k rows
# over-determine every Hessian here by 10x (inputs of at most 1536 channels); with fewer, distinct tokens
# GPTQ was seen to overfit the calibration text (down_proj error 3x below RTN on it, ~equal on other text).
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
# Data-free text costs a generation pass (decode steps, far slower per token than a forward): 32 x 512
# tokens took 35 min on the same loaded 2 cores (8 tok/s batched), hence the cache.
DATA_FREE_SAMPLES = 32
DATA_FREE_VERSION = 1  # bump when the prompts or the sampling change: it invalidates the cache

# Varied on purpose (prose, dialogue, code, math, lists, other languages) so the activations the quantizers
# see cover more than one register. Plain strings continue as text; lists of messages go through the chat
# template, so an instruct model's chat format is covered too.
SEED_PROMPTS: list[str | list[dict[str, str]]] = [
    "The history of the Roman Empire",
    "In 1905, Albert Einstein published",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "The stock market fell sharply on Monday after",
    "def quicksort(arr):\n",
    "import numpy as np\n\n# Load the data and compute",
    "Recipe: chocolate chip cookies\nIngredients:\n",
    "Q: What is the derivative of x^2 * sin(x)?\nA:",
    "The following is a list of the tallest mountains in the world:\n1.",
    "Dear Sir or Madam,\n\nI am writing to",
    "La ville de Paris est",
    "Der schnellste Weg nach Berlin",
    "The patient presented with a fever and",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "SELECT name, COUNT(*) FROM orders",
    "Climate change affects agriculture because",
    "The rules of chess are simple:",
    "<html>\n<head>\n<title>",
    "Breaking news:",
    [{"role": "user", "content": "Explain how a rainbow forms."}],
    [{"role": "user", "content": "Write a short poem about the ocean."}],
    [{"role": "user", "content": "What are three tips for learning a new language?"}],
    [{"role": "user", "content": "Summarize the causes of World War I."}],
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "user", "content": "How do vaccines work?"}],
    [{"role": "user", "content": "Give me a plan for a weekend trip to Rome."}],
    [{"role": "user", "content": "What is 17 times 23? Show your work."}],
]
SAMPLING = dict(temperature=0.8, top_p=0.95)  # fluent but varied; T=0 would repeat itself


def cache_root() -> Path:
    if root := os.environ.get("MIAOTUI_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "miaotui"


# ---- from a file

def tokens_from_file(path: str | os.PathLike, tokenizer, n_samples: int = DEFAULT_SAMPLES,
                     seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at random (seeded) offsets of the tokenized file → (n, seq_len)."""
    _check_sizes(n_samples, seq_len)
    path = Path(path).expanduser()
    if not path.is_file():
        raise MiaotuiError(f"{path}: no such calibration file")
    text = path.read_text(encoding="utf-8", errors="replace")
    # no BOS/special tokens: windows start mid-text anyway
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids if text.strip() else [], dtype=torch.long)
    if ids.numel() == 0:
        raise MiaotuiError(f"{path}: the calibration file is empty")
    if ids.numel() < seq_len:
        raise MiaotuiError(f"{path}: {ids.numel()} tokens, fewer than one calibration window of {seq_len}; "
                           f"give a longer file or a shorter --calib-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


# ---- data-free

def model_identity(path: str | os.PathLike) -> str:
    """Path, size and mtime of the model's files: cheap, and changes whenever the weights do."""
    path = Path(path).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    parts = [str(path)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def data_free_tokens(loaded: "LoadedModel", n_samples: int = DATA_FREE_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                     seed: int = 0, cache_dir: str | os.PathLike | None = None, identity: str | None = None,
                     progress: bool = True) -> torch.Tensor:
    """Text the model samples from ``SEED_PROMPTS`` (seeded), packed into (n_samples, seq_len) windows.

    Cached under ``cache_dir`` (default ``~/.cache/miaotui/calib``) keyed by the model's ``identity`` (default:
    its files' path, size and mtime) and the settings, so only the first call pays for the generation.
    """
    _check_sizes(n_samples, seq_len)
    identity = identity or model_identity(loaded.path)
    settings = dict(identity=identity, n=n_samples, seq_len=seq_len, seed=seed, version=DATA_FREE_VERSION,
                    prompts=SEED_PROMPTS, sampling=SAMPLING)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "calib"
    file = cache / f"data-free-{key}.pt"
    if file.is_file():
        try:
            ids = torch.load(file, weights_only=True)
            if tuple(ids.shape) == (n_samples, seq_len):
                return ids
        except Exception:  # a truncated or foreign file: regenerate and overwrite it
            pass
    ids = _generate(loaded, n_samples, seq_len, seed, progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    torch.save(ids, tmp)
    os.replace(tmp, file)  # atomic: a concurrent reader never sees half a file
    return ids


def _prompt_ids(tokenizer, prompt: str | list[dict[str, Any]]) -> list[int]:
    from miaotui.loading.tokenizer import encode, encode_chat

    if isinstance(prompt, str):
        return encode(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, prompt)
    return encode(tokenizer, prompt[-1]["content"])  # a base model without a template: the text alone


def _generate(loaded: "LoadedModel", n_samples: int, seq_len: int, seed: int, progress: bool) -> torch.Tensor:
    """Documents (prompt + sampled continuation + EOS) concatenated like pretraining text, cut into windows.

    Requests cycle through the prompts; rounds continue until the stream holds n_samples * seq_len tokens
    (documents that stop early at EOS leave the stream short after the first round)."""
    from tqdm import tqdm

    from miaotui.config import SamplingParams
    from miaotui.engine.engine_config import EngineConfig
    from miaotui.engine.llm_engine import LLMEngine

    need = n_samples * seq_len
    prompts = [_prompt_ids(loaded.tokenizer, p) for p in SEED_PROMPTS]
    eos = sorted(loaded.eos_token_ids)
    model_len = min(loaded.model.max_seq_len, max(map(len, prompts)) + seq_len)
    max_new = max(8, model_len - max(map(len, prompts)))
    batch = 32
    engine = LLMEngine(loaded, config=EngineConfig(max_model_len=model_len, max_num_seqs=batch,
                                                   max_num_batched_tokens=max(512, batch)))
    stream: list[int] = []
    k = 0  # requests issued so far: picks the prompt and the seed
    bar = tqdm(total=need, desc="data-free calibration text", unit="tok", disable=not progress)
    while len(stream) < need:
        n_req = min(batch, max(1, -(-(need - len(stream)) // max_new)))
        reqs = {f"calib-{k + j}": (k + j) % len(prompts) for j in range(n_req)}
        outs: dict[str, list[int]] = {rid: [] for rid in reqs}
        for j, (rid, p) in enumerate(reqs.items()):
            engine.add_request(rid, prompts[p], SamplingParams(**SAMPLING, seed=seed * 1_000_003 + k + j,
                                                               max_tokens=max_new))
        k += n_req
        while engine.has_unfinished():  # stepped here (not engine.generate) so the bar moves per token
            for o in engine.step():
                outs[o.request_id].extend(o.new_token_ids)
                bar.update(min(len(o.new_token_ids), need - bar.n))
        for rid, p in reqs.items():  # request order, not finishing order: deterministic
            stream.extend(prompts[p] + outs[rid] + eos[:1])
    bar.update(need - bar.n)
    bar.close()
    return torch.tensor(stream[:need], dtype=torch.long).view(n_samples, seq_len)


# ---- the entry point

def calibration_tokens(loaded: "LoadedModel", file: str | os.PathLike | None = None, n_samples: int | None = None,
                       seq_len: int | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True) -> torch.Tensor:
    """(n_samples, seq_len) token ids: windows of ``file`` if given, else the model's own text (data-free)."""
    seq_len = seq_len or DEFAULT_SEQ_LEN
    if seq_len > loaded.model.max_seq_len:
        raise MiaotuiError(f"calibration length {seq_len} exceeds the model's context {loaded.model.max_seq_len}")
    if file is not None:
        return tokens_from_file(file, loaded.tokenizer, n_samples or DEFAULT_SAMPLES, seq_len, seed)
    return data_free_tokens(loaded, n_samples or DATA_FREE_SAMPLES, seq_len, seed, cache_dir, progress=progress)


def _check_sizes(n_samples: int, seq_len: int) -> None:
    if n_samples < 1 or seq_len < 2:
        raise MiaotuiError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
