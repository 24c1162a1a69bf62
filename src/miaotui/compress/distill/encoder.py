"""Distilling a BERT-family encoder: the student's pooled sentence embeddings (the pooling and normalisation
its sentence-transformers config declares) are pulled towards the teacher's, by 1 − cosine and/or MSE,
optionally with the normalised MSE of chosen layers' outputs.

    teacher = load_encoder(path)
    student = encoder_subset(teacher, evenly_spaced(6, 3))
    report = distill_encoder(student, teacher, texts, steps=300, lr=1e-4)
    report.after["mean_cosine"]                  # on texts held out of training
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from miaotui.compress.distill.config import DistillConfig, DistillError
from miaotui.compress.distill.data import split_holdout
from miaotui.compress.distill.decoder import DistillReport, resolve_layer_map
from miaotui.compress.distill.hooks import layer_outputs
from miaotui.compress.distill.loop import train
from miaotui.compress.distill.losses import embedding_loss, hidden_state_loss
from miaotui.compress.distill.student import layer_subset
from miaotui.compress.distill.trainable import select_trainable, training_mode
from miaotui.loading.encoder import LoadedEncoder
from miaotui.models.bert import pool


def _loaded(x) -> LoadedEncoder:
    loaded = getattr(x, "loaded", x)  # an Encoder wraps its LoadedEncoder
    if not isinstance(loaded, LoadedEncoder):
        raise TypeError(f"expected a LoadedEncoder or an Encoder, got {type(x).__name__}")
    return loaded


def encoder_subset(teacher, keep: Sequence[int]) -> LoadedEncoder:
    """A student keeping the teacher's layers ``keep``, with its tokenizer, pooling and (updated) config."""
    t = _loaded(teacher)
    model = layer_subset(t.model, keep)
    return dataclasses.replace(t, model=model, config={**t.config, "num_hidden_layers": len(keep)})


def tokenize_texts(loaded: LoadedEncoder, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and token types of each text, cut at the model's limit (long paragraphs keep their start)."""
    enc = loaded.tokenizer(list(texts), truncation=True, max_length=loaded.max_tokens, add_special_tokens=True,
                           return_token_type_ids=True, verbose=False)
    return enc["input_ids"], enc["token_type_ids"]


def _embed(model, loaded: LoadedEncoder, ids, types) -> torch.Tensor:
    batch = model.pack(ids, types)
    emb = pool(model(batch), batch, loaded.pooling.modes)
    return F.normalize(emb, dim=-1) if loaded.pooling.normalize else emb


@torch.no_grad()
def embedding_metrics(student: LoadedEncoder, teacher: LoadedEncoder, ids, types,
                      batch_size: int = 32) -> dict[str, float]:
    """Mean/min cosine of each text's embedding to the teacher's and the Spearman correlation of the two
    similarity matrices (``eval/embeddings.py``)."""
    from miaotui.eval.embeddings import evaluate_embeddings

    s_parts, t_parts = [], []
    for i in range(0, len(ids), batch_size):
        s_parts.append(_embed(student.model, student, ids[i:i + batch_size], types[i:i + batch_size]))
        t_parts.append(_embed(teacher.model, teacher, ids[i:i + batch_size], types[i:i + batch_size]))
    s, t = torch.cat(s_parts).cpu().numpy(), torch.cat(t_parts).cpu().numpy()
    if len(ids) < 2:
        cos = float(F.cosine_similarity(torch.from_numpy(s), torch.from_numpy(t)).mean())
        return {"mean_cosine": cos, "min_cosine": cos}
    r = evaluate_embeddings(s, t, [""] * len(ids))
    return {k: r[k] for k in ("mean_cosine", "min_cosine", "similarity_spearman")}


def distill_encoder(student, teacher, texts: Sequence[str], config: DistillConfig | None = None, *,
                    state_path: str | Path | None = None, resume: bool = False, progress: bool = True,
                    **params: Any) -> DistillReport:
    """Train ``student`` (a ``LoadedEncoder`` or ``Encoder``, in place) so its pooled embeddings of ``texts``
    match ``teacher``'s. Loss: ``cosine_loss`` · (1 − cos) + ``mse_loss`` · MSE (+ ``hidden_loss`` · the
    normalised MSE of mapped layers). A seeded ``holdout`` fraction of the texts is never trained on; the
    report gives mean/min cosine and similarity-rank correlation there before and after."""
    cfg = config if config is not None else DistillConfig.from_params(params)
    if config is not None and params:
        raise TypeError("pass either config or keyword hyper-parameters, not both")
    s, t = _loaded(student), _loaded(teacher)
    texts = [x for x in texts if isinstance(x, str) and x.strip()]
    if not texts:
        raise DistillError("no non-empty texts to distil on", "data")
    ids, types = tokenize_texts(t, texts)
    train_idx, held_idx = split_holdout(len(texts), cfg.holdout, cfg.seed)
    held_ids, held_types = [ids[i] for i in held_idx], [types[i] for i in held_idx]
    s_stack, t_stack = s.model.layers, t.model.layers
    lmap = resolve_layer_map(cfg, len(s_stack), len(t_stack))
    t.model.eval().requires_grad_(False)
    before = embedding_metrics(s, t, held_ids, held_types) if held_idx else {}

    def loss_fn(items: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        b_ids = [ids[train_idx[i]] for i in items]
        b_types = [types[train_idx[i]] for i in items]
        pairs = list(lmap.items()) if lmap else []
        with torch.no_grad(), layer_outputs(t_stack, [j for _, j in pairs]) as t_hidden:
            t_emb = _embed(t.model, t, b_ids, b_types)
        with layer_outputs(s_stack, [i for i, _ in pairs]) as s_hidden:
            s_emb = _embed(s.model, s, b_ids, b_types)
        emb = embedding_loss(s_emb, t_emb, cfg.cosine_loss, cfg.mse_loss)
        if not pairs:
            return emb, {}
        hid = hidden_state_loss([s_hidden[i] for i, _ in pairs], [t_hidden[j] for _, j in pairs])
        return emb + cfg.hidden_loss * hid, {"emb": emb.item(), "hidden": hid.item()}

    # the heads (pooler, masked-LM, classifier) are not on the path of the pooled embedding
    trainable = select_trainable(s.model, cfg.train_embeddings, exclude=("pooler", "mlm", "classifier"))
    with training_mode(s.model, trainable):
        result = train(loss_fn, len(train_idx), trainable, cfg, state_path, resume, progress, desc="distill encoder")
    after = embedding_metrics(s, t, held_ids, held_types) if held_idx else {}
    return DistillReport(
        steps=result.steps, resumed_from=result.resumed_from, train_items=len(train_idx),
        holdout_items=len(held_idx), tokens_per_step=None, trainable_params=trainable.numel,
        masked_zeros=trainable.masked, frozen_quantized_modules=trainable.frozen_quantized, layer_map=lmap,
        loss_first=result.losses[0] if result.losses else None,
        loss_last=result.losses[-1] if result.losses else None,
        before=before, after=after, seconds=round(result.seconds, 2))
