"""The decoder search: from a causal LM and a quality budget to the fastest checkpoint that meets it.

    result = optimize(OptimizeConfig(model=None, budget="ppl+3%", output=Path("out/opt")))
    result.chosen, result.exit_code, result.report["candidates"]

``optimize`` sends encoders (a BERT-family folder, or any ``cosine`` / ``spearman`` budget with no model)
to ``encoder_search.py``; the loop both share (cache, time limit, choice, report) is ``loop.py``. What is
the decoders' own:

1. The evaluation text is cut into a search split and a held-out split of token windows; the source's
   log-probs on both are computed once (``splits.py``).
2. Candidates come from ``candidates.propose``; each is built on a fresh copy of the source
   (``measure.build``), evaluated on the search split against those log-probs and timed for the objective
   with the real engine (``measure.py``). A quantize-only candidate whose runtime formats equal those of a
   measured in-budget one and whose bytes are no fewer is skipped unbuilt (``candidates.estimate``).
3. Per-layer sensitivity (``sensitivity.py``: each layer int4-quantized or removed alone, KLD) orders the
   mixed-precision and layer-dropping candidates.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

from miaotui.optimize.budget import BudgetError, parse_budget
from miaotui.optimize.candidates import Candidate, ModelShape, estimate, propose, unstructured_note
from miaotui.optimize.config import OptimizeConfig, OptimizeError
from miaotui.optimize.loop import STATE_DIR, Built, Entry, OptimizeResult, SearchLoop
from miaotui.optimize.measure import OBJECTIVES, Shared, SpeedSettings, build, quality, speed
from miaotui.optimize.sensitivity import Sensitivity, layer_sensitivity

__all__ = ["DecoderSearch", "OptimizeResult", "optimize"]

# Build cost of a step before one was measured, in units of one evaluation of the search split (the
# baseline's): RTN is a rounding pass; GPTQ/AWQ run every calibration token through each layer with
# per-layer solves (measured ~10-20x an evaluation on SmolLM2); distillation trains for many steps.
PRIOR_BUILD = {"quantize/rtn": 0.3, "quantize/smoothquant": 3.0, "quantize/gptq": 12.0, "quantize/awq": 12.0,
               "prune-channels": 3.0, "prune-heads": 3.0, "prune-layers": 1.0, "prune": 4.0, "lowrank": 4.0,
               "distill": 60.0}


class DecoderSearch(SearchLoop):
    """One search over a causal LM (implements ``candidates.SearchState`` through ``SearchLoop``)."""

    kind = "decoder"
    objectives = OBJECTIVES
    prior_build = PRIOR_BUILD

    def __init__(self, cfg: OptimizeConfig, log: Callable[[str], None] | None = None):
        super().__init__(cfg, log)
        self.speed_settings = SpeedSettings(decode_tokens=cfg.decode_tokens, repeats=cfg.repeats,
                                            compile=cfg.compile)

    def prepare(self) -> None:
        from miaotui.compress.recipe import Calibration
        from miaotui.bench.prompts import prompt_ids
        from miaotui.eval.reference import model_fingerprint
        from miaotui.loading import load
        from miaotui.models import CausalLM
        from miaotui.optimize.splits import make_splits

        cfg = self.cfg
        source = load(cfg.model, "fp32", progress=cfg.progress)
        if not isinstance(source.model, CausalLM):
            raise OptimizeError(f"{source.path}: a {type(source.model).__name__}, not a causal LM: this search "
                                "is for decoders")
        if self.budget.for_encoder:
            raise BudgetError(f"budget {self.budget}: cosine / spearman are encoder measures; for a decoder "
                              "use ppl, kld or top1 (e.g. ppl+3%)")
        source.model.fuse()
        source.model.eval()
        t = time.monotonic()
        self.log(f"reference: the source on {cfg.search_windows} search + {cfg.heldout_windows} held-out windows "
                 f"of {cfg.ctx} tokens")
        self.splits = make_splits(source, cfg.data, cfg.ctx, cfg.search_windows, cfg.heldout_windows,
                                  cfg.output / STATE_DIR, progress=cfg.progress)
        self.reference_s = time.monotonic() - t
        self.source, self.shape = source, ModelShape.of(source.model)
        self.fingerprint = model_fingerprint(source.path)
        self.shared = Shared(Calibration(cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed), source)
        self.prompt = lambda n: prompt_ids(source.tokenizer, n, cfg.data)

    def propose(self) -> Iterator[Candidate]:
        return propose(self, self.shape)

    def heldout_share(self) -> float:
        return self.cfg.heldout_windows / max(self.cfg.search_windows, 1)

    def cannot_win(self, c: Candidate) -> tuple[str, str] | None:
        est = estimate(self.shape, c.steps)
        if est is None:
            return None
        nbytes, kinds = est
        for e in self.entries.values():
            if e.outcome != "pass":
                continue
            if self.cfg.objective == "memory" and e.record["bytes"] <= nbytes:
                return "skipped-dominated", (f"no smaller than {e.candidate.name} (within budget): "
                                             f"{nbytes / 1e6:.1f} vs {e.record['bytes'] / 1e6:.1f} MB")
            if e.record.get("kinds") == sorted(kinds) and e.record["bytes"] <= nbytes:
                return "skipped-dominated", (f"same runtime formats as {e.candidate.name} (within budget) and "
                                             f"no fewer bytes ({nbytes / 1e6:.1f} vs {e.record['bytes'] / 1e6:.1f} MB): "
                                             "it cannot be faster")
        return None

    def build(self, c: Candidate) -> tuple[Built, float]:
        loaded, modules, records, seconds = build(self.shared, c.steps, c.name)
        return (loaded, modules, records), seconds

    def measure(self, c: Candidate, built: Built) -> tuple[dict[str, Any], float, float]:
        loaded, modules, _ = built
        t = time.monotonic()
        q = quality(loaded, self.splits.search)
        eval_s = time.monotonic() - t
        sp = speed(loaded, c.name, self.cfg.objective, self.prompt, self.speed_settings)
        est = estimate(self.shape, c.steps)
        fields = {"quality": q, "speed": {k: v for k, v in sp.items() if k != "seconds"}, "bytes": sp["bytes"],
                  "decode_bytes": sp["decode_bytes"], "kinds": sorted(est[1]) if est else _kinds(modules)}
        return fields, eval_s, sp["seconds"]

    def time_speed(self, c: Candidate, built: Built) -> float:
        return speed(built[0], c.name, self.cfg.objective, self.prompt, self.speed_settings)["value"]

    def heldout_quality(self, built: Built) -> dict:
        return quality(built[0], self.splits.heldout)

    def sensitivity_plan(self, kind: str) -> tuple[list, float, str]:
        n = min(self.cfg.sensitivity_windows, self.cfg.search_windows)
        est = (self.costs.unit or 0.0) * n / max(self.cfg.search_windows, 1) * self.shape.n_layers
        what = "quantized to int4 alone" if kind == "quant" else "removed alone"
        return [self.splits.split_id("search"), n], est, \
            f"each of {self.shape.n_layers} layers {what}, KLD on {n} window(s)"

    def compute_sensitivity(self, kind: str) -> Sensitivity:
        n = min(self.cfg.sensitivity_windows, self.cfg.search_windows)
        ref = self.splits.search.subset(n)
        return layer_sensitivity(self.source.model, ref, kind, progress=lambda i, total: self.tick())

    def write_checkpoint(self, e: Entry, built: Built, heldout_q: dict) -> dict:
        from miaotui.loading.checkpoint import save_checkpoint, source_identity

        loaded, modules, records = built
        loaded.model.clear_cache()
        recipe = {"name": e.candidate.name, "steps": e.candidate.steps, "records": records,
                  "optimize": {"budget": str(self.budget), "objective": self.cfg.objective, "report": "report.json"}}
        return save_checkpoint(self.cfg.output, loaded.model, loaded.tokenizer, loaded.config, modules, recipe,
                               source_identity(loaded.path), quality=self.checkpoint_quality(e, heldout_q))

    def finished_ok(self) -> None:
        from miaotui.optimize.splits import remove_reference_files

        remove_reference_files(self.cfg.output / STATE_DIR)

    def skipped_notes(self) -> list[dict[str, str]]:
        note = unstructured_note()
        return [note] if note is not None else []

    def describe_quality(self, q: dict) -> str:
        parts = [f"ppl {q['perplexity']:.3f}"]
        if q.get("reference_perplexity"):
            parts[0] += f" ({100 * (q['perplexity'] / q['reference_perplexity'] - 1):+.2f}%)"
        if q.get("kld_mean") is not None:
            parts.append(f"KLD {q['kld_mean']:.4g}")
        if q.get("top1_agreement") is not None:
            parts.append(f"top-1 {100 * q['top1_agreement']:.1f}%")
        return ", ".join(parts)

    def report_extra(self) -> dict[str, Any]:
        cfg = self.cfg
        ref_search = self.splits.reference_perplexity("search")
        return {
            "quality_axis": {"limit_search": self.budget.primary.limit({"reference_perplexity": ref_search})},
            "data": {"file": self.splits.data, "sha256": self.splits.data_sha256, "ctx": cfg.ctx,
                     "search_windows": cfg.search_windows, "heldout_windows": cfg.heldout_windows,
                     "reference_perplexity_search": ref_search,
                     "reference_perplexity_heldout": self.splits.reference_perplexity("heldout")},
            "settings": {"speed": self.speed_settings.to_dict(), "families": list(self.families),
                         "sensitivity_windows": cfg.sensitivity_windows, "calib": cfg.calib,
                         "max_candidates": cfg.max_candidates},
        }


def _kinds(modules: dict[str, dict]) -> list[str]:
    kinds = {s["kind"] for name, s in modules.items() if name != "lm_head"}
    return sorted(kinds or {"dense"})


def is_encoder_search(cfg: OptimizeConfig) -> bool:
    """An encoder folder (or checkpoint) as the model, or no model and an encoder budget (cosine, spearman):
    the default encoder, all-MiniLM-L6-v2."""
    from pathlib import Path

    from miaotui.loading.encoder import is_encoder_folder

    if cfg.model is None:
        return parse_budget(cfg.budget).for_encoder
    return is_encoder_folder(Path(cfg.model).expanduser())


def optimize(cfg: OptimizeConfig, log: Callable[[str], None] | None = None) -> OptimizeResult:
    """Run the search described by ``cfg`` (``loop.py``'s docstring) with the decoder or encoder search;
    ``cfg.objective`` None is the kind's default (decode / throughput)."""
    if is_encoder_search(cfg):
        from miaotui.optimize.encoder_search import EncoderSearch

        search_cls = EncoderSearch
    else:
        search_cls = DecoderSearch
    if cfg.objective is None:
        cfg = dataclasses.replace(cfg, objective=next(iter(search_cls.objectives)))
    return search_cls(cfg, log).run()
