"""The encoder search: from a BERT-family encoder and a ``cosine`` / ``spearman`` budget to the fastest
checkpoint that meets it (the loop, cache, time limit and report are ``loop.py``'s).

    result = optimize(OptimizeConfig(model=None, budget="cosine>=0.99", output=Path("out/minilm")))

1. The paragraphs of ``--data`` are cut into a search split and a held-out split; the source's embeddings
   of both are computed once (``encoder_splits.py``).
2. Candidates come from ``encoder_candidates.propose_encoder``; each is built on a fresh copy of the source
   through the recipe steps ``miaotui compress`` runs on encoders, compared with the source's embeddings on
   the search split and timed with the encoder engine (``encoder_measure.py``).
3. Per-layer sensitivity (``encoder_sensitivity.py``: each layer under W8A8 or removed alone, 1 − mean
   cosine) orders the mixed W8A8 and the layer-dropping candidates.
4. The winner is written as a normal encoder checkpoint (with the source's sentence-transformers files), so
   ``miaotui embed --model DIR`` loads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from miaotui.optimize.budget import BudgetError
from miaotui.optimize.candidates import Candidate
from miaotui.optimize.config import OptimizeConfig, OptimizeError
from miaotui.optimize.encoder_candidates import EncoderShape, propose_encoder
from miaotui.optimize.encoder_measure import (OBJECTIVES, EncoderShared, EncoderSpeedSettings, build_encoder,
                                              embed, embedding_quality, encoder_speed, measure_encoder,
                                              runtime_kinds)
from miaotui.optimize.loop import STATE_DIR, Built, Entry, SearchLoop
from miaotui.optimize.sensitivity import Sensitivity

# Build cost of a step before one was measured, in evaluations of the search split: W8A8 smoothing encodes
# the calibration texts once; head and layer pruning score on them; distillation trains (forward and
# backward of student and teacher) for many steps, which is slow on a CPU.
PRIOR_BUILD = {"quantize/rtn": 0.2, "quantize/smoothquant": 1.5, "prune-heads": 1.5, "prune-layers": 1.5,
               "prune-channels": 1.5, "distill": 40.0}
DEFAULT_SENSITIVITY_TEXTS = 32


class EncoderSearch(SearchLoop):
    kind = "encoder"
    objectives = OBJECTIVES
    prior_build = PRIOR_BUILD

    def __init__(self, cfg: OptimizeConfig, log: Callable[[str], None] | None = None):
        super().__init__(cfg, log)
        if not self.budget.for_encoder:
            raise BudgetError(f"budget {self.budget}: ppl, kld and top1 are decoder measures; for an encoder use "
                              "cosine (mean embedding cosine to the source's) or spearman (similarity rank "
                              "correlation), e.g. cosine>=0.99")
        self.speed_settings = EncoderSpeedSettings(repeats=cfg.repeats)
        self.objective = cfg.objective
        self.distill_data = cfg.calib  # distillation needs text the evaluation never sees

    def prepare(self) -> None:
        from miaotui.compress.recipe import Calibration
        from miaotui.eval.reference import model_fingerprint
        from miaotui.loading.encoder import load_encoder
        from miaotui.optimize.encoder_splits import make_text_splits

        cfg = self.cfg
        source = load_encoder(cfg.model, "fp32", progress=cfg.progress)
        if source.format != "hf":
            raise OptimizeError(f"{source.path}: a compressed checkpoint; search from the original encoder folder")
        source.model.fuse()
        source.model.eval()
        self.source = source
        self.fingerprint = model_fingerprint(source.path)
        t = time.monotonic()
        self.splits = make_text_splits(source, cfg.data, cfg.search_texts, cfg.heldout_texts, self.fingerprint,
                                       cfg.output / STATE_DIR)
        self.reference_s = time.monotonic() - t
        self.log(f"reference: the source's embeddings of {len(self.splits.search)} search + "
                 f"{len(self.splits.heldout)} held-out paragraphs of {self.splits.data}")
        self.shape = EncoderShape(len(source.model.layers), source.model.args.num_attention_heads)
        self.shared = EncoderShared(Calibration(cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed), source)
        if "distill" in self.families and self.distill_data is None:
            self.log("distillation needs --calib FILE (text disjoint from the evaluation paragraphs): not searched")

    def propose(self) -> Iterator[Candidate]:
        return propose_encoder(self, self.shape)

    def heldout_share(self) -> float:
        return len(self.splits.heldout) / max(len(self.splits.search), 1)

    def build(self, c: Candidate) -> tuple[Built, float]:
        loaded, modules, records, seconds = build_encoder(self.shared, c.steps, c.name, getattr(c, "dtype", "fp32"))
        return (loaded, modules, records), seconds

    def measure(self, c: Candidate, built: Built) -> tuple[dict[str, Any], float, float]:
        from miaotui.optimize.measure import stored_bytes

        loaded, modules, _ = built
        q, sp, eval_s, speed_s = measure_encoder(loaded, self.splits.search, self.splits.search_ref,
                                                 self.cfg.objective, self.speed_settings)
        fields = {"quality": q, "speed": sp, "bytes": stored_bytes(loaded.model),
                  "kinds": runtime_kinds(modules, loaded.model),
                  "layers": len(loaded.model.layers)}
        return fields, eval_s, speed_s

    def time_speed(self, c: Candidate, built: Built) -> float:
        return encoder_speed(built[0], self.splits.search, self.cfg.objective, self.speed_settings)["value"]

    def heldout_quality(self, built: Built) -> dict:
        return embedding_quality(embed(built[0], self.splits.heldout), self.splits.heldout_ref)

    def _sensitivity_texts(self) -> int:
        n = self.cfg.sensitivity_texts or DEFAULT_SENSITIVITY_TEXTS
        return max(2, min(n, len(self.splits.search)))

    def sensitivity_plan(self, kind: str) -> tuple[list, float, str]:
        n = self._sensitivity_texts()
        est = (self.costs.unit or 0.0) * n / max(len(self.splits.search), 1) * self.shape.n_layers
        what = "under W8A8" if kind == "w8a8" else "removed"
        return [self.splits.split_id("search"), n], est, \
            f"each of {self.shape.n_layers} layers {what} alone, 1 − mean cosine on {n} paragraph(s)"

    def compute_sensitivity(self, kind: str) -> Sensitivity:
        from miaotui.optimize.encoder_sensitivity import encoder_layer_sensitivity

        n = self._sensitivity_texts()
        return encoder_layer_sensitivity(self.source, self.splits.search[:n], self.splits.search_ref[:n], kind,
                                         progress=lambda i, total: self.tick())

    def write_checkpoint(self, e: Entry, built: Built, heldout_q: dict) -> dict:
        from miaotui.loading.checkpoint import save_checkpoint, source_identity
        from miaotui.loading.encoder import copy_pooling_files

        loaded, modules, records = built
        dtype = getattr(e.candidate, "dtype", "fp32")
        recipe = {"name": e.candidate.name, "steps": e.candidate.steps, "records": records,
                  "optimize": {"budget": str(self.budget), "objective": self.cfg.objective, "report": "report.json",
                               "dtype": dtype}}
        quality = {**self.checkpoint_quality(e, heldout_q), "data": self.splits.data, "reference": "source (fp32)"}
        manifest = save_checkpoint(self.cfg.output, loaded.model, loaded.tokenizer, loaded.config, modules, recipe,
                                   source_identity(Path(loaded.path)), quality=quality)
        copy_pooling_files(Path(loaded.path), self.cfg.output)
        return manifest

    def choice_note(self, e: Entry) -> str:
        if getattr(e.candidate, "dtype", "fp32") == "bf16":
            return " (stored in bf16: run it with --dtype bf16, as it was measured)"
        return ""

    def skipped_notes(self) -> list[dict[str, str]]:
        notes = []
        if "distill" in self.families and self.distill_data is None:
            notes.append({"name": "distill", "reason": "needs --calib FILE: an encoder distils on real text, which "
                                                       "must not be the evaluation paragraphs"})
        for fam in ("groups", "lowrank"):
            if fam in self.families:
                notes.append({"name": fam, "reason": "a decoder family (int4 group sizes, low-rank): not searched "
                                                     "for encoders"})
        return notes

    def describe_quality(self, q: dict) -> str:
        return (f"cosine {q['mean_cosine']:.5f} (min {q['min_cosine']:.4f}), "
                f"spearman {q['similarity_spearman']:.5f}")

    def report_extra(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "data": {"file": self.splits.data, "sha256": self.splits.data_sha256,
                     "search_texts": len(self.splits.search), "heldout_texts": len(self.splits.heldout)},
            "settings": {"speed": self.speed_settings.to_dict(), "families": list(self.families),
                         "sensitivity_texts": self._sensitivity_texts(), "calib": cfg.calib,
                         "distill_data": self.distill_data, "max_candidates": cfg.max_candidates},
        }
