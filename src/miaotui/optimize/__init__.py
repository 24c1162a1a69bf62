"""``miaotui optimize``: search compression recipes for the fastest model within a quality budget.

    from miaotui.optimize import OptimizeConfig, optimize
    result = optimize(OptimizeConfig(model=None, budget="ppl+3%", output="out/opt", time_limit="20m"))
    print(result.message)          # the choice, its speed and its held-out quality
    result.report["candidates"]    # every candidate: recipe, quality, speed, bytes, time

Modules: ``budget`` (SPEC parsing), ``loop`` (the loop every model kind shares: cache, time limit, the
choice, held-out check), ``cache`` (resumable results), ``pareto``, ``report`` (report.md, report.json,
pareto.png); decoders: ``search`` (the decoder search and ``optimize``, which picks the kind), ``splits``
(search / held-out windows and the source's reference), ``sensitivity`` (per-layer), ``candidates`` (what
to try, what cannot win), ``measure`` (build, quality, speed); encoders: ``encoder_search``,
``encoder_splits`` (paragraphs), ``encoder_sensitivity``, ``encoder_candidates``, ``encoder_measure``.
"""

from miaotui.optimize.budget import Budget, BudgetError, parse_budget
from miaotui.optimize.config import OptimizeConfig, OptimizeError, parse_duration
from miaotui.optimize.pareto import pareto_front
from miaotui.optimize.search import OptimizeResult, optimize

__all__ = ["Budget", "BudgetError", "OptimizeConfig", "OptimizeError", "OptimizeResult", "optimize",
           "parse_budget", "parse_duration", "pareto_front"]
