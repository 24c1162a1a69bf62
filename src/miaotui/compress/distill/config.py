"""What a distillation run is told: one dataclass, validated once, shared by the library, the CLI and recipes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from miaotui.errors import MiaotuiError


class DistillError(MiaotuiError):
    """Bad distillation input: a parameter out of range, data too short, a resume that does not match."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # the offending parameter's name, so a recipe step can name it


@dataclass
class DistillConfig:
    """Hyper-parameters of one run.

    An optimizer step consumes ``batch_size * grad_accum`` sequences (decoder windows of ``seq_len`` tokens,
    or encoder texts). The learning rate warms up linearly for ``warmup`` steps (default: 10 % of ``steps``)
    and then follows a cosine down to ``min_lr_ratio * lr``.
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256  # decoder window length (encoders: texts are cut at the model's own limit)
    temperature: float = 2.0  # decoder: softmax temperature of the KL term (scaled back by T²)
    hidden_loss: float = 0.0  # weight of the normalised hidden-state MSE (0: logits only)
    cosine_loss: float = 1.0  # encoder: weight of 1 - cos(student, teacher) of the pooled embeddings
    mse_loss: float = 0.0  # encoder: weight of the MSE of the pooled embeddings
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # healing a pretrained model: no pull towards zero by default
    max_grad_norm: float = 1.0  # 0: no clipping
    holdout: float = 0.1  # fraction of the data kept out of training to measure the result
    seed: int = 0
    save_every: int = 0  # steps between training-state checkpoints (0: only on interrupt)
    train_embeddings: bool = False  # embeddings (and a head tied to them) stay frozen unless True
    layer_map: dict[int, int] | None = field(default=None)  # student layer → teacher layer (hidden loss)

    def __post_init__(self) -> None:
        if self.layer_map is not None:
            try:
                self.layer_map = {int(k): int(v) for k, v in dict(self.layer_map).items()}
            except (TypeError, ValueError):
                raise DistillError(f"layer_map must map student layer indices to teacher layer indices, "
                                   f"got {self.layer_map!r}", "layer_map") from None
        if self.warmup is None:
            self.warmup = self.steps // 10
        checks = [
            ("steps", self.steps >= 1, "at least 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a positive number"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("grad_accum", self.grad_accum >= 1, "at least 1"),
            ("seq_len", self.seq_len >= 2, "at least 2"),
            ("temperature", self.temperature > 0, "positive"),
            ("hidden_loss", self.hidden_loss >= 0, "0 or more"),
            ("cosine_loss", self.cosine_loss >= 0, "0 or more"),
            ("mse_loss", self.mse_loss >= 0, "0 or more"),
            ("warmup", 0 <= self.warmup < self.steps or self.warmup == 0, "0 or more and below steps"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "between 0 and 1"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"),
            ("max_grad_norm", self.max_grad_norm >= 0, "0 or more"),
            ("holdout", 0 <= self.holdout < 1, "in [0, 1)"),
            ("save_every", self.save_every >= 0, "0 or more"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise DistillError(f"{name} must be {want}, got {getattr(self, name)!r}", name)
        if self.cosine_loss == 0 and self.mse_loss == 0:
            raise DistillError("cosine_loss and mse_loss cannot both be 0", "cosine_loss")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "DistillConfig":
        """From a recipe step's or the CLI's mapping; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise DistillError(f"unknown parameter(s) {', '.join(unknown)} (allowed: {', '.join(sorted(known))})",
                               unknown[0])
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # what a resumed run must share with the run that saved the state (save_every may change)
    def fingerprint(self) -> dict[str, Any]:
        d = self.to_dict()
        d.pop("save_every")
        if d["layer_map"] is not None:
            d["layer_map"] = {str(k): v for k, v in d["layer_map"].items()}
        return d
