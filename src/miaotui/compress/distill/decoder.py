"""Distilling a decoder (``CausalLM``) into a student: KL on temperature-scaled logits, plus an optional
normalised MSE between chosen layers' outputs.

    student, keep = layer_subset(teacher, evenly_spaced(30, 15)), ...
    report = distill(student, teacher, windows, steps=200, lr=1e-4, temperature=2.0,
                     hidden_loss=1.0, layer_map=layer_map(keep))
    report.holdout_kl_before, report.holdout_kl_after       # on windows held out of training
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from miaotui.compress.distill.config import DistillConfig, DistillError
from miaotui.compress.distill.data import split_holdout
from miaotui.compress.distill.hooks import layer_outputs
from miaotui.compress.distill.loop import train
from miaotui.compress.distill.losses import hidden_state_loss, kl_loss
from miaotui.compress.distill.student import blocks, default_layer_map
from miaotui.compress.distill.trainable import select_trainable, training_mode


@dataclass
class DistillReport:
    """What a run did and what it achieved on data it did not train on (recorded in the manifest)."""

    steps: int
    resumed_from: int
    train_items: int  # windows (decoders) or texts (encoders) trained on
    holdout_items: int
    tokens_per_step: int | None
    trainable_params: int
    masked_zeros: int  # weights held at zero (pruning masks)
    frozen_quantized_modules: int
    layer_map: dict[int, int] | None
    loss_first: float | None
    loss_last: float | None
    before: dict[str, float] = field(default_factory=dict)  # held-out metrics before training
    after: dict[str, float] = field(default_factory=dict)  # ... and after
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["layer_map"] is not None:
            d["layer_map"] = {str(k): v for k, v in d["layer_map"].items()}
        return d


def resolve_layer_map(cfg: DistillConfig, n_student: int, n_teacher: int) -> dict[int, int] | None:
    """The student→teacher layer pairs of the hidden-state loss (None when it is off)."""
    if cfg.hidden_loss == 0:
        return None
    lm = cfg.layer_map if cfg.layer_map is not None else (
        {i: i for i in range(n_student)} if n_student == n_teacher else default_layer_map(n_student, n_teacher))
    bad = {s: t for s, t in lm.items() if not (0 <= s < n_student and 0 <= t < n_teacher)}
    if bad:
        raise DistillError(f"layer_map pairs {bad} are outside the student's {n_student} / the teacher's "
                           f"{n_teacher} layers", "layer_map")
    return dict(sorted(lm.items()))


@torch.no_grad()
def holdout_metrics(student, teacher, windows: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Mean KL(teacher ‖ student) per token at T=1, and both models' perplexity, on ``windows``."""
    kl_sum = s_nll = t_nll = 0.0
    n_tok = 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(student.device)
        s, t = student(ids).float(), teacher(ids).float()
        rows = ids.shape[0] * ids.shape[1]
        kl_sum += kl_loss(s, t, 1.0).item() * rows
        n_tok += rows
        targets = ids[:, 1:].reshape(-1)
        s_nll += F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), targets, reduction="sum").item()
        t_nll += F.cross_entropy(t[:, :-1].reshape(-1, t.shape[-1]), targets, reduction="sum").item()
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    return {"kl": kl_sum / n_tok, "perplexity": math.exp(s_nll / n_pred),
            "teacher_perplexity": math.exp(t_nll / n_pred)}


def distill(student, teacher, token_windows: torch.Tensor, config: DistillConfig | None = None, *,
            state_path: str | Path | None = None, resume: bool = False, progress: bool = True,
            **params: Any) -> DistillReport:
    """Train ``student`` (a ``CausalLM``, in place) to imitate ``teacher`` on ``token_windows`` (W, T).

    Hyper-parameters come from ``config`` or as keywords (``steps``, ``lr``, ``temperature``, ``hidden_loss``,
    ``batch_size``, ``grad_accum``, ``layer_map``, ... see ``DistillConfig``). A seeded ``holdout`` fraction
    of the windows is never trained on; the report gives KL and perplexity there before and after.
    ``state_path``: where the training state is saved (every ``save_every`` steps, at the end, on Ctrl-C);
    ``resume``: continue from it. Linears that are quantized stay frozen; exact zeros stay zero.
    """
    cfg = config if config is not None else DistillConfig.from_params(params)
    if config is not None and params:
        raise TypeError("pass either config or keyword hyper-parameters, not both")
    windows = torch.as_tensor(token_windows, dtype=torch.long)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise DistillError(f"token windows must be (W, T>=2), got {tuple(windows.shape)}", "data")
    if student.vocab_size != teacher.vocab_size:
        raise DistillError(f"the student's vocabulary ({student.vocab_size}) differs from the teacher's "
                           f"({teacher.vocab_size}): logits cannot be compared", "student")
    if int(windows.max()) >= teacher.vocab_size:
        raise DistillError("token ids exceed the vocabulary (data tokenized for another model?)", "data")
    train_idx, held_idx = split_holdout(windows.shape[0], cfg.holdout, cfg.seed)
    train_w, held_w = windows[train_idx], windows[held_idx]
    s_stack, t_stack = blocks(student), blocks(teacher)
    lmap = resolve_layer_map(cfg, len(s_stack), len(t_stack))
    teacher.eval().requires_grad_(False)
    for m in (student, teacher):
        m.clear_cache()
    before = holdout_metrics(student, teacher, held_w, cfg.batch_size) if len(held_idx) else {}

    def loss_fn(items: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        ids = train_w[items].to(student.device)
        pairs = list(lmap.items()) if lmap else []
        with torch.no_grad(), layer_outputs(t_stack, [t for _, t in pairs]) as t_hidden:
            t_logits = teacher(ids)
        with layer_outputs(s_stack, [s for s, _ in pairs]) as s_hidden:
            s_logits = student(ids)
        kl = kl_loss(s_logits, t_logits, cfg.temperature)
        if not pairs:
            return kl, {}
        hid = hidden_state_loss([s_hidden[s] for s, _ in pairs], [t_hidden[t] for _, t in pairs])
        return kl + cfg.hidden_loss * hid, {"kl": kl.item(), "hidden": hid.item()}

    trainable = select_trainable(student, cfg.train_embeddings)
    student.eval()  # no dropout in these models; eval only documents that nothing behaves differently
    with training_mode(student, trainable):
        result = train(loss_fn, len(train_idx), trainable, cfg, state_path, resume, progress)
    after = holdout_metrics(student, teacher, held_w, cfg.batch_size) if len(held_idx) else {}
    return DistillReport(
        steps=result.steps, resumed_from=result.resumed_from, train_items=len(train_idx),
        holdout_items=len(held_idx), tokens_per_step=cfg.batch_size * cfg.grad_accum * windows.shape[1],
        trainable_params=trainable.numel, masked_zeros=trainable.masked,
        frozen_quantized_modules=trainable.frozen_quantized, layer_map=lmap,
        loss_first=result.losses[0] if result.losses else None,
        loss_last=result.losses[-1] if result.losses else None,
        before=before, after=after, seconds=round(result.seconds, 2))
