"""The library API for encoders: ``Encoder(model).encode(texts)``, ``.fill_mask(text)``, ``.classify(texts)``.

>>> enc = Encoder()                          # all-MiniLM-L6-v2, the default encoder
>>> enc.encode(["a cat", "a dog"]).shape     # normalised, as its sentence-transformers config asks
(2, 384)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from miaotui.errors import MiaotuiError, PromptTooLongError
from miaotui.loading.encoder import LoadedEncoder, load_encoder
from miaotui.models.bert import pool

Text = str | tuple[str, str]  # a text, or a pair (e.g. for a cross-encoder classifier)


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model's limit and were cut."""


class MissingHeadError(MiaotuiError):
    """The model has no weights for the head a command needs (masked-LM, classifier)."""


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first), so packing leaves little padding for attention."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


class Encoder:
    """A loaded encoder with its tokenizer and pooling.

    ``dtype``: "fp32" or "bf16" (see ``encoder/prepare.py`` for what bf16 does on CPUs without bf16
    instructions); ``compile``: compile the layer stack with torch.compile (first batches pay the compile).
    """

    def __init__(self, model: str | Path | LoadedEncoder | None = None, dtype: str = "fp32",
                 compile: bool = False, progress: bool = False):
        from miaotui.encoder.prepare import prepare_encoder

        self.loaded = model if isinstance(model, LoadedEncoder) else load_encoder(model, dtype, progress)
        self.model = prepare_encoder(self.loaded.model)
        if compile:
            self.model.compile()

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def max_tokens(self) -> int:
        return self.loaded.max_tokens

    @property
    def dim(self) -> int:
        return self.model.args.hidden_size * len(self.loaded.pooling.modes)

    # -- tokens --------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[Text], truncate: bool = True) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token types per input, cut to ``max_tokens`` (with a warning) or refused."""
        if isinstance(texts, (str, tuple)):
            texts = [texts]
        if len(texts) == 0:
            raise MiaotuiError("no input texts")
        for i, t in enumerate(texts):
            parts = t if isinstance(t, tuple) else (t,)
            if not all(isinstance(p, str) for p in parts):
                raise MiaotuiError(f"input {i} is not a string: {type(t).__name__}")
            if not any(p.strip() for p in parts):
                raise MiaotuiError(f"input {i} is empty")
        first = [t[0] if isinstance(t, tuple) else t for t in texts]
        second = [t[1] for t in texts] if isinstance(texts[0], tuple) else None
        enc = self.tokenizer(first, second, add_special_tokens=True, return_token_type_ids=True,
                             verbose=False)  # over-long inputs get our own warning below
        ids, types = enc["input_ids"], enc["token_type_ids"]
        long = [i for i, s in enumerate(ids) if len(s) > self.max_tokens]
        if long and not truncate:
            raise self._too_long(long, [len(ids[i]) for i in long])
        if long:
            # only the over-long inputs are tokenized again: the tokenizer knows where special tokens go
            cut = self.tokenizer([first[i] for i in long], [second[i] for i in long] if second else None,
                                 truncation=True, max_length=self.max_tokens, return_token_type_ids=True,
                                 verbose=False)
            for j, i in enumerate(long):
                ids[i], types[i] = cut["input_ids"][j], cut["token_type_ids"][j]
            warnings.warn(f"{len(long)} input(s) longer than {self.max_tokens} tokens were truncated",
                          TruncationWarning, stacklevel=3)
        return ids, types

    def _too_long(self, long: list[int], lengths: list[int]) -> PromptTooLongError:
        i = long[0]
        err = PromptTooLongError(f"input {i} has {lengths[0]} tokens, more than the model's limit of "
                                 f"{self.max_tokens} ({len(long)} input(s) too long; truncation is off)")
        err.index = i  # which input: the server names it in its 400
        return err

    @functools.cached_property
    def special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after one text ([CLS] … [SEP], <s> … </s>), found by
        tokenizing a probe with and without them (transformers 5 has no build_inputs_with_special_tokens)."""
        bare = self.tokenizer("probe", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("probe", add_special_tokens=True)["input_ids"]
        for k in range(len(full) - len(bare) + 1):
            if full[k:k + len(bare)] == bare:
                return full[:k], full[k + len(bare):]
        raise MiaotuiError("cannot tell where this tokenizer puts its special tokens")

    def from_token_ids(self, seqs: Sequence[Sequence[int]], truncate: bool = True) -> tuple[list[list[int]], list[list[int]]]:
        """Token-id inputs (a text's ids without special tokens, as ``tokenizer(text, add_special_tokens=False)``
        gives them) → ids and token types as ``tokenize`` returns for that text; cut or refused like it."""
        before, after = self.special_tokens
        room = self.max_tokens - len(before) - len(after)
        vocab = self.model.args.vocab_size
        for i, seq in enumerate(seqs):
            if len(seq) == 0:
                raise MiaotuiError(f"input {i} is empty")
            if any(not 0 <= t < vocab for t in seq):
                raise MiaotuiError(f"input {i} has token ids outside the vocabulary [0, {vocab})")
        long = [i for i, seq in enumerate(seqs) if len(seq) > room]
        if long and not truncate:
            raise self._too_long(long, [len(seqs[i]) + len(before) + len(after) for i in long])
        if long:
            warnings.warn(f"{len(long)} input(s) longer than {self.max_tokens} tokens were truncated",
                          TruncationWarning, stacklevel=2)
        ids = [before + list(seq[:room]) + after for seq in seqs]
        return ids, [[0] * len(x) for x in ids]

    # -- forward passes ------------------------------------------------------------------------------------
    def _run(self, ids: list[list[int]], types: list[list[int]], batch_size: int, progress: bool, fn,
             out_dim: int) -> torch.Tensor:
        """``fn(hidden, packed) → (B, out_dim)`` over length-sorted packed batches, in input order."""
        from tqdm import tqdm

        if batch_size < 1:
            raise MiaotuiError(f"batch size must be at least 1 (got {batch_size})")
        out = torch.empty(len(ids), out_dim)
        with torch.inference_mode(), tqdm(total=len(ids), unit="text", disable=not progress) as bar:
            for idx in length_sorted_batches([len(s) for s in ids], batch_size):
                batch = self.model.pack([ids[i] for i in idx], [types[i] for i in idx])
                out[idx] = fn(self.model(batch), batch).float()
                bar.update(len(idx))
        return out

    def encode(self, texts: Text | Sequence[Text], batch_size: int = 32, normalize: bool | None = None,
               convert_to: str = "numpy", truncate: bool = True, progress: bool = False) -> np.ndarray | torch.Tensor:
        """Sentence embeddings (B, dim) in fp32, pooled as the folder says; ``normalize`` None = the folder's
        choice (sentence-transformers' Normalize module), True/False to force it."""
        single = isinstance(texts, (str, tuple))
        ids, types = self.tokenize(texts, truncate)
        emb = self.embed(ids, types, batch_size, normalize, progress)
        emb = emb[0] if single else emb
        return emb.numpy() if convert_to == "numpy" else emb

    def embed(self, ids: list[list[int]], types: list[list[int]] | None = None, batch_size: int = 32,
              normalize: bool | None = None, progress: bool = False) -> torch.Tensor:
        """``encode`` for inputs already tokenized (special tokens included, within ``max_tokens``): (B, dim)."""
        types = types if types is not None else [[0] * len(x) for x in ids]
        modes = self.loaded.pooling.modes
        emb = self._run(ids, types, batch_size, progress, lambda h, b: pool(h, b, modes), self.dim)
        if normalize if normalize is not None else self.loaded.pooling.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    def fill_mask(self, text: str, top_k: int = 5) -> list[list[dict]]:
        """For each mask token in ``text``, the ``top_k`` likeliest tokens: [{token_id, token, score, sequence}]."""
        if self.model.mlm is None:
            raise MissingHeadError(f"{self.loaded.path}: this model has no masked-LM head (no cls.predictions.* "
                                   "or lm_head.* weights); fill-mask needs e.g. a *ForMaskedLM checkpoint")
        tok = self.tokenizer
        for alias in ("[MASK]", "<mask>"):  # accept either family's spelling
            text = text.replace(alias, tok.mask_token)
        if tok.mask_token not in text:
            raise MiaotuiError(f"no mask token in the input: write {tok.mask_token} where a word is missing")
        ids, types = self.tokenize([text])
        rows = [j for j, t in enumerate(ids[0]) if t == tok.mask_token_id]
        with torch.inference_mode():
            batch = self.model.pack(ids, types)
            probs = self.model.mlm(self.model(batch)[rows]).float().softmax(-1)  # only the masked rows
        results = []
        for r, p in zip(rows, probs):
            top = p.topk(top_k)
            cands = []
            for score, tid in zip(top.values.tolist(), top.indices.tolist()):
                filled = list(ids[0])
                filled[r] = tid
                cands.append({"token_id": tid, "token": tok.decode([tid]).strip(), "score": score,
                              "sequence": tok.decode(filled, skip_special_tokens=True)})
            results.append(cands)
        return results

    def classify(self, texts: Text | Sequence[Text], top_k: int | None = 1, batch_size: int = 32,
                 truncate: bool = True, progress: bool = False) -> list[list[dict]]:
        """Per input, labels with scores (softmax; sigmoid for multi-label models), best first."""
        if self.model.classifier is None:
            raise MissingHeadError(f"{self.loaded.path}: this model has no sequence-classification head (no "
                                   "classifier.* weights); classify needs a *ForSequenceClassification checkpoint")
        ids, types = self.tokenize([texts] if isinstance(texts, (str, tuple)) else texts, truncate)
        n_labels = self.model.classifier.out.out_features
        logits = self._run(ids, types, batch_size, progress, self.model.classify, n_labels)
        multi = self.model.args.problem_type == "multi_label_classification"
        scores = logits.sigmoid() if multi else logits.softmax(-1)
        names = self.model.args.id2label
        out = []
        for row in scores.tolist():
            ranked = sorted(range(n_labels), key=lambda j: -row[j])[:top_k]
            out.append([{"label": names.get(j, f"LABEL_{j}"), "score": row[j]} for j in ranked])
        return out
