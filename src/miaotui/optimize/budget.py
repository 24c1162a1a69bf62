"""Quality budgets: ``ppl+3%``, ``ppl<=25``, ``kld<=0.02``, ``top1>=0.95``, ``cosine>=0.99``, ``spearman>=0.98``.

A budget is one or more comma-separated constraints, all of which a candidate must meet::

    budget = parse_budget("ppl+3%, top1>=0.9")
    budget.met({"perplexity": 20.9, "reference_perplexity": 20.5, "top1_agreement": 0.93})   # True

Relative perplexity (``ppl+3%``, or ``ppl+0.5`` for an absolute increase) is checked against the reference's
perplexity on the same windows, so the search split and the held-out split each get their own limit.
``cosine`` / ``spearman`` are the encoder measures of ``eval/embeddings.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from miaotui.errors import MiaotuiError


class BudgetError(MiaotuiError):
    """A --budget that does not parse, or that this model cannot be measured against."""


# name in the SPEC → (key in the quality dict, direction: "<=" lower is better, ">=" higher is better, label)
METRICS: dict[str, tuple[str, str, str]] = {
    "ppl": ("perplexity", "<=", "perplexity"),
    "kld": ("kld_mean", "<=", "mean KL divergence"),
    "kld99": ("kld_p99", "<=", "99th-percentile KL divergence"),
    "top1": ("top1_agreement", ">=", "top-1 agreement"),
    "cosine": ("mean_cosine", ">=", "mean embedding cosine"),
    "spearman": ("similarity_spearman", ">=", "similarity rank correlation"),
}
ALIASES = {"perplexity": "ppl", "kl": "kld", "kld_mean": "kld", "kld_p99": "kld99", "top-1": "top1",
           "top1_agreement": "top1", "cos": "cosine"}
ENCODER_METRICS = {"cosine", "spearman"}
EXAMPLES = "ppl+3%, ppl+0.5, ppl<=25, kld<=0.02, kld99<=0.5, top1>=0.95, cosine>=0.99, spearman>=0.98"

_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
_RELATIVE = re.compile(rf"^(?P<metric>[a-z0-9_-]+)\s*\+\s*(?P<value>{_NUMBER})\s*(?P<pct>%?)$")
_COMPARE = re.compile(rf"^(?P<metric>[a-z0-9_-]+)\s*(?P<op><=|>=|<|>|=<|=>)\s*(?P<value>{_NUMBER})\s*(?P<pct>%?)$")


@dataclass(frozen=True)
class Constraint:
    metric: str  # a key of METRICS
    op: str  # "<=" or ">="
    value: float  # the limit; with ``relative``, the allowed increase
    relative: str | None = None  # None, "%" (ppl+3%) or "+" (ppl+0.5)
    text: str = ""

    @property
    def key(self) -> str:
        return METRICS[self.metric][0]

    def limit(self, quality: dict) -> float:
        """The threshold on ``quality`` (a relative one needs ``reference_perplexity`` in it)."""
        if self.relative is None:
            return self.value
        ref = quality.get("reference_perplexity")
        if ref is None:
            raise BudgetError(f"{self.text}: a relative perplexity budget needs the reference's perplexity")
        return ref * (1 + self.value / 100) if self.relative == "%" else ref + self.value

    def measured(self, quality: dict) -> float:
        v = quality.get(self.key)
        if v is None:
            raise BudgetError(f"{self.text}: the evaluation did not measure {METRICS[self.metric][2]} ({self.key})")
        return float(v)

    def met(self, quality: dict) -> bool:
        v, lim = self.measured(quality), self.limit(quality)
        if math.isnan(v):
            return False
        return v <= lim if self.op == "<=" else v >= lim

    def violation(self, quality: dict) -> float:
        """How far outside the limit, relative to it (0 when met): ranks candidates when none is in budget."""
        v, lim = self.measured(quality), self.limit(quality)
        if math.isnan(v):
            return math.inf
        over = v - lim if self.op == "<=" else lim - v
        return max(0.0, over) / max(abs(lim), 1e-12)

    def describe(self, quality: dict) -> str:
        """``perplexity 21.30 <= 21.07`` with the numbers of this evaluation."""
        return f"{self.metric} {_fmt(self.measured(quality))} {self.op} {_fmt(self.limit(quality))}"


@dataclass(frozen=True)
class Budget:
    constraints: tuple[Constraint, ...]
    text: str = ""

    @property
    def for_encoder(self) -> bool:
        return any(c.metric in ENCODER_METRICS for c in self.constraints)

    @property
    def primary(self) -> Constraint:
        """The first constraint: its metric is the quality axis of the report and the Pareto frontier."""
        return self.constraints[0]

    def met(self, quality: dict) -> bool:
        return all(c.met(quality) for c in self.constraints)

    def failures(self, quality: dict) -> list[str]:
        return [c.describe(quality) for c in self.constraints if not c.met(quality)]

    def violation(self, quality: dict) -> float:
        return max(c.violation(quality) for c in self.constraints)

    def __str__(self) -> str:
        return self.text


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _metric(name: str, text: str) -> str:
    name = ALIASES.get(name, name)
    if name not in METRICS:
        raise BudgetError(f"budget {text!r}: unknown measure {name!r} (known: {', '.join(METRICS)}; "
                          f"examples: {EXAMPLES})")
    return name


def parse_constraint(text: str) -> Constraint:
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise BudgetError(f"empty constraint in the budget (examples: {EXAMPLES})")
    if m := _RELATIVE.match(s):
        metric = _metric(m["metric"], text)
        if metric != "ppl":
            raise BudgetError(f"budget {text!r}: only perplexity takes a relative increase (ppl+3%); give "
                              f"{metric} as a limit, e.g. {metric}{METRICS[metric][1]}0.02")
        value = float(m["value"])
        return Constraint("ppl", "<=", value, "%" if m["pct"] else "+", text.strip())
    if m := _COMPARE.match(s):
        metric = _metric(m["metric"], text)
        op = {"<": "<=", "=<": "<=", ">": ">=", "=>": ">="}.get(m["op"], m["op"])
        want = METRICS[metric][1]
        if op != want:
            better = "lower" if want == "<=" else "higher"
            raise BudgetError(f"budget {text!r}: {METRICS[metric][2]} is better {better}, so its budget is "
                              f"'{metric}{want}VALUE'")
        value = float(m["value"]) / (100 if m["pct"] else 1)
        if metric in ("top1", "cosine", "spearman") and not (value <= 1.0):
            raise BudgetError(f"budget {text!r}: {METRICS[metric][2]} is at most 1 (write 0.95 or 95%)")
        return Constraint(metric, op, value, None, text.strip())
    raise BudgetError(f"budget {text!r} does not parse (examples: {EXAMPLES})")


def parse_budget(spec: str) -> Budget:
    """Parse ``SPEC`` (comma-separated constraints, all to be met); raises ``BudgetError`` with examples."""
    if not isinstance(spec, str) or not spec.strip():
        raise BudgetError(f"an empty budget (examples: {EXAMPLES})")
    constraints = tuple(parse_constraint(part) for part in spec.split(","))
    kinds = {c.metric in ENCODER_METRICS for c in constraints}
    if len(kinds) > 1:
        raise BudgetError(f"budget {spec!r} mixes decoder measures (ppl, kld, top1) with encoder ones "
                          "(cosine, spearman): a model is one or the other")
    return Budget(constraints, spec.strip())
