"""Training data: token windows for decoders, texts for encoders, and the held-out split neither trains on.

Decoders train on windows of a user's text file or of the data-free calibration text (what the model writes
itself from fixed seed prompts, ``compress/calib.py``). Encoders train on the paragraphs (or lines) of a
file, or on the same data-free text decoded and split at document ends.
"""

from __future__ import annotations

from pathlib import Path

import torch

from miaotui.compress.distill.config import DistillError


def cut_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Token ids (any shape, read in order) → non-overlapping (W, seq_len) windows; a partial tail is dropped."""
    flat = ids.reshape(-1)
    n = flat.numel() // seq_len
    if n == 0:
        raise DistillError(f"the training data has {flat.numel()} tokens, fewer than one window of {seq_len}",
                           "seq_len")
    return flat[: n * seq_len].view(n, seq_len).clone()


def file_windows(path: str | Path, tokenizer, seq_len: int) -> torch.Tensor:
    """A text file, tokenized whole (no special tokens), in windows of ``seq_len``."""
    from miaotui.eval.data import read_text, tokenize

    try:
        text = read_text(path)
    except Exception as e:  # EvalDataError and friends: one clear message naming the parameter
        raise DistillError(str(e), "data") from None
    return cut_windows(torch.tensor(tokenize(tokenizer, text), dtype=torch.long), seq_len)


def split_holdout(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, held-out) of ``n`` items: a seeded random ``fraction`` held out (at least one when
    ``fraction > 0``), and at least one item left to train on."""
    if n < 1:
        raise DistillError("no training data", "data")
    k = 0 if fraction <= 0 else min(max(1, round(n * fraction)), n - 1)
    if fraction > 0 and k == 0:
        raise DistillError(f"{n} sequence(s) of data: too few to keep a held-out part (pass holdout 0 or more "
                           "data)", "holdout")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[k:]), sorted(order[:k])


def read_texts(path: str | Path) -> list[str]:
    """Paragraphs (blank-line separated) of a text file, or its lines when it has no blank lines;
    ``.jsonl``: the "text" field of each line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        from miaotui.encoder.io import read_texts as read_jsonl

        texts = read_jsonl(path)
    else:
        from miaotui.eval.data import read_text

        try:
            text = read_text(path)
        except Exception as e:
            raise DistillError(str(e), "data") from None
        paragraphs = [p.strip() for p in text.split("\n\n")]
        texts = [p for p in paragraphs if p] if len(paragraphs) > 1 else \
            [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise DistillError(f"{path}: no texts in the file", "data")
    return texts


def data_free_texts(seed: int = 0, progress: bool = True) -> list[str]:
    """The default decoder's data-free calibration text (cached after its first generation), decoded and
    split into its documents: varied prose, dialogue, code and lists for an encoder to imitate its teacher on."""
    from miaotui.compress.calib import calibration_tokens
    from miaotui.loading import load

    lm = load(None, "fp32")
    ids = calibration_tokens(lm, seed=seed, progress=progress)
    eos = sorted(lm.eos_token_ids)
    text = lm.tokenizer.decode(ids.reshape(-1).tolist(), skip_special_tokens=False)
    for e in eos:
        text = text.replace(lm.tokenizer.decode([e]), "\n\n")
    for special in getattr(lm.tokenizer, "all_special_tokens", []):
        text = text.replace(special, " ")
    # documents → paragraphs; very short fragments (a role marker, a lone bullet) carry nothing to learn
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 20]
