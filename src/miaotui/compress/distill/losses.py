"""The distillation losses: logits (decoders), hidden states (any stack of layers), pooled embeddings (encoders)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), summed over the vocabulary, mean over positions.

    The T² keeps the gradient's size independent of T (Hinton et al. 2015), so a learning rate tuned at one
    temperature still fits another. Logits (..., V) of any leading shape; computed in fp32.
    """
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layer pairs of ‖s − t‖² / ‖t‖² per position (then mean over positions).

    Normalised by the teacher state's own size: residual streams grow with depth (and a few channels carry
    huge outliers in many LLMs), so a plain MSE would be dominated by the deepest layer's largest channels.
    """
    if not student or len(student) != len(teacher):
        raise ValueError(f"need matching, non-empty lists of hidden states ({len(student)} vs {len(teacher)})")
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean()
    return total / len(student)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, cosine: float = 1.0,
                   mse: float = 0.0) -> torch.Tensor:
    """``cosine`` · mean(1 − cos(s, t)) + ``mse`` · MSE(s, t) of pooled embeddings (B, D)."""
    s, t = student.float(), teacher.float()
    loss = s.new_zeros(())
    if cosine:
        loss = loss + cosine * (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if mse:
        loss = loss + mse * F.mse_loss(s, t)
    return loss
