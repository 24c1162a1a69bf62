"""What an evaluation found: one dataclass, its JSON form and a printable table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from miaotui.eval.tasks import TaskResult


def _small(x: float) -> str:
    return f"{x:.6f}" if abs(x) >= 1e-3 else f"{x:.2e}"


@dataclass
class EvalReport:
    model: str
    ctx: int
    windows: int
    first: int  # first scored logit row of each window
    tokens: int  # scored tokens
    perplexity: float
    perplexity_stderr: float
    data: str = ""
    dtype: str = ""  # the evaluated model's parameter dtype
    reference: str | None = None
    reference_perplexity: float | None = None
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None  # a fraction
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Flat JSON-ready dict; a task adds ``<task>_accuracy`` and ``<task>_perplexity``."""
        d = asdict(self)
        d.pop("tasks")
        for name, r in self.tasks.items():
            d[f"{name}_accuracy"] = r.accuracy
            d[f"{name}_perplexity"] = r.perplexity
            d[f"{name}_n"] = r.n
        return d

    def table(self) -> str:
        rows = [("model", f"{self.model} ({self.dtype})" if self.dtype else self.model)]
        if self.reference:
            rows.append(("reference", self.reference))
        rows.append(("data", f"{self.data} — {self.windows} windows × {self.ctx} tokens, "
                             f"{self.tokens} scored (positions {self.first + 1}..{self.ctx - 1})"))
        rows.append(("perplexity", f"{self.perplexity:.4f} ± {self.perplexity_stderr:.4f}"))
        if self.kld_mean is not None:
            rows += [("reference perplexity", f"{self.reference_perplexity:.4f}"),
                     ("KLD mean", _small(self.kld_mean)),
                     ("KLD median", _small(self.kld_median)),
                     ("KLD p99", _small(self.kld_p99)),
                     ("KLD max", _small(self.kld_max)),
                     ("top-1 agreement", f"{100 * self.top1_agreement:.2f}%")]
        for name, r in self.tasks.items():
            rows += [(f"{name} accuracy", f"{100 * r.accuracy:.2f}% ({r.n} items)"),
                     (f"{name} perplexity", f"{r.perplexity:.3f}")]
        rows.append(("time", f"{self.seconds:.1f} s"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
