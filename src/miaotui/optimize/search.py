"""The search: from a model and a quality budget to the fastest checkpoint that meets it, with the evidence.

    result = optimize(OptimizeConfig(model=None, budget="ppl+3%", output=Path("out/opt")))
    result.chosen, result.exit_code, result.report["candidates"]

1. The evaluation text is cut into a search split and a held-out split; the source's log-probs on both
   are computed once (``splits.py``).
2. Candidates come from ``candidates.propose`` in order; each is built on a fresh copy of the source
   (``run_recipe``), evaluated on the search split and timed for the objective (``measure.py``), and its
   result appended to ``DIR/search/results.jsonl`` (``cache.py``): a resumed run reuses it.
   Before building, a candidate is skipped when it cannot win (``candidates`` module docstring) or when
   its estimated cost would overrun the time limit (``CostModel``).
3. The winner is the fastest candidate within budget on the search split that still meets the budget on
   the held-out split (else the next fastest); it is written to DIR as a normal checkpoint, with
   ``report.md``, ``report.json`` and ``pareto.png`` (``report.py``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miaotui.errors import MiaotuiError
from miaotui.optimize.budget import Budget, BudgetError, parse_budget
from miaotui.optimize.cache import ResultCache, candidate_key
from miaotui.optimize.candidates import Candidate, ModelShape, estimate, propose, unstructured_note
from miaotui.optimize.config import OptimizeConfig, OptimizeError
from miaotui.optimize.measure import OBJECTIVES, Shared, SpeedSettings, build, quality, speed
from miaotui.optimize.pareto import pareto_front
from miaotui.optimize.sensitivity import Sensitivity, layer_sensitivity

STATE_DIR = "search"  # DIR/search: results, sensitivity, reference log-probs
RESULTS = "results.jsonl"
SENSITIVITY = "sensitivity.json"
CHECKPOINT_FILES = ("manifest.json", "model.safetensors")

# Build cost of a step before one was measured, in units of one evaluation of the search split (the
# baseline's): RTN is a rounding pass; GPTQ/AWQ run every calibration token through each layer with
# per-layer solves (measured ~10-20x an evaluation on SmolLM2); distillation trains for many steps.
PRIOR_BUILD = {"quantize/rtn": 0.3, "quantize/smoothquant": 3.0, "quantize/gptq": 12.0, "quantize/awq": 12.0,
               "prune-channels": 3.0, "prune-heads": 3.0, "prune-layers": 1.0, "prune": 4.0, "lowrank": 4.0,
               "distill": 60.0}


class CostModel:
    """Seconds a candidate will take: build (per step kind, learned from the ones measured) + evaluation +
    speed measurement (learned from the baseline on)."""

    def __init__(self) -> None:
        self.unit: float | None = None  # one evaluation of the search split
        self.measure_s: float | None = None  # evaluation + speed of one candidate
        self.build: dict[str, float] = {}

    def learn(self, c: Candidate, build_s: float, eval_s: float, speed_s: float) -> None:
        if self.unit is None:
            self.unit = eval_s
        self.measure_s = eval_s + speed_s if self.measure_s is None else \
            0.5 * self.measure_s + 0.5 * (eval_s + speed_s)
        kinds = c.step_kinds()
        if kinds:  # split a chain's build time by the prior shares of its steps
            priors = [PRIOR_BUILD.get(k, 4.0) for k in kinds]
            for k, p in zip(kinds, priors):
                self.build[k] = build_s * p / sum(priors)

    def estimate(self, c: Candidate) -> float:
        if self.unit is None:
            return 0.0  # nothing measured yet: the baseline always starts (it calibrates this model)
        build = sum(self.build.get(k, PRIOR_BUILD.get(k, 4.0) * self.unit) for k in c.step_kinds())
        return build + (self.measure_s or self.unit)


@dataclass
class OptimizeResult:
    status: str  # "ok" | "none-in-budget" | "heldout-failed" | "nothing-measured"
    message: str
    chosen: str | None
    report: dict[str, Any]
    output: Path
    exit_code: int = 0


@dataclass
class _Entry:
    """One candidate as the search saw it."""

    candidate: Candidate
    outcome: str  # pass | fail | error | skipped-time | skipped-dominated | skipped-parent
    record: dict | None = None
    reason: str = ""
    from_cache: bool = False


class Search:
    """One run (implements ``candidates.SearchState`` for the candidate generator)."""

    def __init__(self, cfg: OptimizeConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.budget: Budget = parse_budget(cfg.budget)
        self.families = tuple(cfg.families)
        self.log = log or (lambda s: print(f"[optimize] {s}", file=sys.stderr, flush=True))
        self.entries: dict[str, _Entry] = {}
        self.order: list[str] = []
        self.costs = CostModel()
        self.speed_settings = SpeedSettings(decode_tokens=cfg.decode_tokens, repeats=cfg.repeats,
                                            compile=cfg.compile)
        self.sens: dict[str, Sensitivity | None] = {}
        self.kept: tuple[str, Any, dict, list] | None = None  # (name, loaded, modules, records) of the best
        self.built = 0  # candidates built in this run (not from the cache)
        self.taken = 0  # candidates measured or read from the cache
        self.t0 = time.monotonic()
        self.bar = None

    # ---- SearchState

    def outcome(self, c: Candidate) -> str | None:
        e = self.entries.get(c.name)
        return e.outcome if e else None

    def loss(self, name: str) -> float | None:
        e = self.entries.get(name)
        if e is None or e.record is None or e.outcome not in ("pass", "fail"):
            return None
        return self._loss(e.record)

    def fastest_passing(self, quantized_only: bool = False) -> Candidate | None:
        passing = [e for e in self.entries.values() if e.outcome == "pass"
                   and (not quantized_only or e.candidate.steps)]
        if not passing:
            return None
        return max(passing, key=lambda e: self._score(e.record)).candidate

    def sensitivity(self, kind: str) -> Sensitivity | None:
        if kind not in self.sens:
            self.sens[kind] = self._sensitivity(kind)
        return self.sens[kind]

    # ---- scores

    def _loss(self, rec: dict) -> float:
        c = self.budget.primary
        v = c.measured(rec["quality"])
        return v if c.op == "<=" else -v

    def _score(self, rec: dict) -> float:
        v = rec["speed"]["value"]
        return v if OBJECTIVES[self.cfg.objective][2] else -v

    # ---- time

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.cfg.time_limit - self.elapsed()

    def reserve(self) -> float:
        """Time kept for the end: the held-out check of the winner and writing it."""
        if self.costs.unit is None:
            return 0.0
        return self.costs.unit * self.cfg.heldout_windows / max(self.cfg.search_windows, 1) * 1.2 + 5.0

    # ---- the run

    def run(self) -> OptimizeResult:
        cfg = self.cfg
        out = cfg.output
        self._prepare_output()
        state = out / STATE_DIR
        from miaotui.loading import load
        from miaotui.models import CausalLM

        self.log(f"budget {self.budget} · objective {cfg.objective} · time limit {_dur(cfg.time_limit)}")
        source = load(cfg.model, "fp32", progress=cfg.progress)
        if not isinstance(source.model, CausalLM):
            raise OptimizeError(f"{source.path}: optimize searches decoder (causal LM) models; this is "
                                f"{type(source.model).__name__}")
        if self.budget.for_encoder:
            raise BudgetError(f"budget {self.budget}: cosine / spearman are encoder measures; for a decoder "
                              "use ppl, kld or top1 (e.g. ppl+3%)")
        source.model.fuse()
        source.model.eval()
        from miaotui.eval.reference import model_fingerprint
        from miaotui.optimize.splits import make_splits

        t = time.monotonic()
        self.log(f"reference: the source on {cfg.search_windows} search + {cfg.heldout_windows} held-out windows "
                 f"of {cfg.ctx} tokens")
        self.splits = make_splits(source, cfg.data, cfg.ctx, cfg.search_windows, cfg.heldout_windows, state,
                                  progress=cfg.progress)
        self.reference_s = time.monotonic() - t
        self.source, self.shape = source, ModelShape.of(source.model)
        self.fingerprint = model_fingerprint(source.path)
        self.cache = ResultCache(state / RESULTS)
        if len(self.cache):
            held = sum(1 for r in self.cache.records.values() if r.get("split") == "heldout")
            self.log(f"resuming: {len(self.cache) - held} candidate result(s) and {held} held-out check(s) "
                     f"cached in {state / RESULTS}")
        from miaotui.compress.recipe import Calibration

        self.shared = Shared(Calibration(cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed), source)
        from miaotui.bench.prompts import prompt_ids

        self.prompt = lambda n: prompt_ids(source.tokenizer, n, cfg.data)
        self._progress_bar()
        stopped = ""
        try:
            stopped = self._loop()
        finally:
            if self.bar is not None:
                self.bar.close()
        result = self._finish(stopped)
        return result

    def _prepare_output(self) -> None:
        out = self.cfg.output
        state = out / STATE_DIR
        if out.exists() and not out.is_dir():
            raise OptimizeError(f"{out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not state.is_dir() and not (out / "manifest.json").is_file():
            raise OptimizeError(f"{out} exists and is neither an optimize output nor a miaotui checkpoint: "
                                "refusing to write into it")
        if not self.cfg.resume and state.is_dir():
            shutil.rmtree(state)
        state.mkdir(parents=True, exist_ok=True)

    def _progress_bar(self) -> None:
        if not self.cfg.progress:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=int(self.cfg.time_limit), desc="optimize", unit="s", file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}")

    def _tick(self) -> None:
        if self.bar is None:
            return
        self.bar.n = min(int(self.elapsed()), self.bar.total)
        best = self.fastest_passing()
        best_txt = "-"
        if best is not None:
            rec = self.entries[best.name].record
            best_txt = f"{best.name} {_speed(rec['speed'])}"
        tried = sum(1 for e in self.entries.values() if e.record is not None)
        self.bar.set_postfix_str(f"tried {tried} · best {best_txt} · {_dur(max(self.left(), 0))} left")

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[optimize] {text}", file=sys.stderr)
        else:
            self.log(text)

    def _loop(self) -> str:
        gen = propose(self, self.shape)
        for c in gen:
            if c.name in self.entries:  # proposed twice (e.g. the same base by two routes)
                continue
            if self.cfg.max_candidates is not None and self.taken >= self.cfg.max_candidates:
                gen.close()
                return f"candidate limit ({self.cfg.max_candidates}) reached"
            self.order.append(c.name)
            self._take(c)
            self._tick()
        return ""

    def _key(self, c: Candidate) -> str:
        cfg = self.cfg
        return candidate_key(c.steps, source=self.fingerprint, split=self.splits.split_id("search"),
                             objective=cfg.objective, speed=self.speed_settings.to_dict(),
                             calib=[cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed])

    def _take(self, c: Candidate) -> None:
        key = self._key(c)
        rec = self.cache.get(key)
        if rec is not None:
            self.taken += 1
            self._enter(c, rec, from_cache=True)
            return
        reason = self._cannot_win(c)
        if reason:
            self.entries[c.name] = _Entry(c, reason[0], reason=reason[1])
            self._say(f"skip {c.name}: {reason[1]}")
            return
        est = self.costs.estimate(c)
        if self.elapsed() + est + self.reserve() > self.cfg.time_limit:
            self.entries[c.name] = _Entry(c, "skipped-time", reason=f"time limit: needs ~{_dur(est)}, "
                                                                    f"{_dur(max(self.left(), 0))} left")
            self._say(f"skip {c.name}: {self.entries[c.name].reason}")
            return
        self.taken += 1
        rec = self._measure(c, key)
        self.cache.put(rec)
        self._enter(c, rec, from_cache=False)

    def _cannot_win(self, c: Candidate) -> tuple[str, str] | None:
        if c.parent is not None and self.outcome(Candidate(c.parent, [], "")) in ("fail", "error"):
            return "skipped-parent", f"compresses further than {c.parent}, which already misses the budget"
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

    def _measure(self, c: Candidate, key: str) -> dict:
        import gc

        started = self.elapsed()
        what = json.dumps(c.steps) if c.steps else "the source as is"
        self._say(f"measure {c.name}: {c.note if c.note and len(what) > 160 else what}")
        rec: dict[str, Any] = {"key": key, "name": c.name, "family": c.family, "note": c.note,
                               "steps": c.steps, "started_s": round(started, 2)}
        try:
            loaded, modules, records, build_s = build(self.shared, c.steps, c.name)
            self.built += 1
            t = time.monotonic()
            q = quality(loaded, self.splits.search)
            eval_s = time.monotonic() - t
            sp = speed(loaded, c.name, self.cfg.objective, self.prompt, self.speed_settings)
        except (MiaotuiError, ValueError, RuntimeError) as e:  # a step that refuses this model, a bad shape
            rec.update(status="error", error=f"{type(e).__name__}: {e}", total_s=round(self.elapsed() - started, 2))
            self._say(f"  {c.name} failed: {rec['error']}")
            return rec
        est = estimate(self.shape, c.steps)
        rec.update(status="measured", quality=q, speed={k: v for k, v in sp.items() if k != "seconds"},
                   bytes=sp["bytes"], decode_bytes=sp["decode_bytes"],
                   kinds=sorted(est[1]) if est else _kinds(modules), build_s=round(build_s, 2),
                   eval_s=round(eval_s, 2), speed_s=round(sp["seconds"], 2),
                   total_s=round(self.elapsed() - started, 2),
                   records=[{k: v for k, v in r.items() if k in ("step", "seconds", "modules", "kinds")}
                            for r in records])
        self.costs.learn(c, build_s, eval_s, sp["seconds"])
        if self.budget.met(q) and self._beats_kept(rec):
            self.kept = (c.name, loaded, modules, records)  # the winner-to-be stays in memory: no rebuild
        del loaded
        gc.collect()
        return rec

    def _beats_kept(self, rec: dict) -> bool:
        if self.kept is None:
            return True
        kept = self.entries.get(self.kept[0])
        return kept is None or kept.record is None or self._score(rec) > self._score(kept.record)

    def _enter(self, c: Candidate, rec: dict, from_cache: bool) -> None:
        if rec.get("status") != "measured":
            self.entries[c.name] = _Entry(c, "error", rec, reason=rec.get("error", ""), from_cache=from_cache)
            return
        if from_cache:
            # a cached result still teaches the cost model what this machine takes
            self.costs.learn(c, rec.get("build_s", 0.0), rec.get("eval_s", 0.0), rec.get("speed_s", 0.0))
        met = self.budget.met(rec["quality"])
        self.entries[c.name] = _Entry(c, "pass" if met else "fail", rec, from_cache=from_cache)
        verdict = "within budget" if met else "misses: " + "; ".join(self.budget.failures(rec["quality"]))
        self._say(f"  {c.name}{' (cached)' if from_cache else ''}: {_quality(rec['quality'])} · "
                  f"{_speed(rec['speed'])} · {rec['bytes'] / 1e6:.1f} MB · {verdict}")

    # ---- sensitivity

    def _sensitivity(self, kind: str) -> Sensitivity | None:
        import hashlib

        cfg = self.cfg
        n = min(cfg.sensitivity_windows, cfg.search_windows)
        ident = json.dumps([kind, self.fingerprint, self.splits.split_id("search"), n])
        key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        path = cfg.output / STATE_DIR / SENSITIVITY
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if key in stored:
            s = stored[key]
            return Sensitivity(s["kind"], s["kld"], s["settings"])
        est = (self.costs.unit or 0.0) * n / max(cfg.search_windows, 1) * self.shape.n_layers
        if self.elapsed() + est + self.reserve() > cfg.time_limit:
            self.entries[f"sensitivity ({kind})"] = _Entry(Candidate(f"sensitivity ({kind})", [], "sensitivity"),
                                                           "skipped-time", reason=f"time limit: needs ~{_dur(est)}")
            self._say(f"skip per-layer sensitivity ({kind}): needs ~{_dur(est)}, {_dur(max(self.left(), 0))} left")
            return None
        what = "quantized to int4 alone" if kind == "quant" else "removed alone"
        self._say(f"sensitivity: each of {self.shape.n_layers} layers {what}, KLD on {n} window(s)")
        t = time.monotonic()
        ref = self.splits.search.subset(n)
        sens = layer_sensitivity(self.source.model, ref, kind, progress=lambda i, total: self._tick())
        sens.settings["seconds"] = round(time.monotonic() - t, 2)
        stored[key] = sens.to_dict()
        path.write_text(json.dumps(stored, indent=1))
        top = sorted(range(len(sens.kld)), key=lambda i: -sens.kld[i])[:3]
        self._say(f"  most sensitive layers: {top} (KLD {', '.join(f'{sens.kld[i]:.3g}' for i in top)})")
        return sens

    # ---- the end: choose, check on held-out, write

    def _finish(self, stopped: str) -> OptimizeResult:
        cfg = self.cfg
        measured = [e for e in self.entries.values() if e.record is not None and e.outcome in ("pass", "fail")]
        passing = sorted((e for e in measured if e.outcome == "pass"), key=lambda e: -self._score(e.record))
        heldout_rejected: list[dict] = []
        chosen, heldout_q = None, None
        for e in passing:
            q = self._heldout(e)
            if q is None:
                heldout_rejected.append({"name": e.candidate.name, "failures": ["could not be rebuilt"]})
                continue
            if self.budget.met(q):
                chosen, heldout_q = e, q
                break
            heldout_rejected.append({"name": e.candidate.name, "quality": q, "failures": self.budget.failures(q)})
            self._say(f"{e.candidate.name} misses the budget on the held-out split "
                      f"({'; '.join(self.budget.failures(q))}): trying the next")
        if chosen is not None:
            status, code = "ok", 0
            gain = self._gain(chosen)
            message = (f"chose {chosen.candidate.name}: {_speed(chosen.record['speed'])}{gain}, "
                       f"{chosen.record['bytes'] / 1e6:.1f} MB; held-out {_quality(heldout_q)} "
                       f"(budget {self.budget}) → {cfg.output}")
            if not chosen.candidate.steps:
                message = ("no compressed candidate meets the budget: the source itself is the fastest within "
                           f"it; written unchanged to {cfg.output}")
        else:
            closest = min(measured, key=lambda e: self.budget.violation(e.record["quality"]), default=None)
            code = 2
            if not measured:
                status = "nothing-measured"
                message = ("no candidate was measured within the time limit "
                           f"({_dur(cfg.time_limit)}): give a longer --time-limit")
            elif passing:
                status = "heldout-failed"
                message = (f"every candidate within budget on the search split missed it on the held-out split "
                           f"(budget {self.budget}); closest: {heldout_rejected[0]['name']}")
            else:
                status = "none-in-budget"
                c = closest.record
                message = (f"no candidate meets the budget {self.budget}; the closest is {closest.candidate.name} "
                           f"({'; '.join(self.budget.failures(c['quality']))}; {_speed(c['speed'])}). "
                           "Loosen the budget or allow more time/families")
            for f in CHECKPOINT_FILES:  # no stale checkpoint from an earlier run may pass for this result
                (cfg.output / f).unlink(missing_ok=True)
        report = self._report(status, message, stopped, chosen, heldout_q, heldout_rejected)
        if chosen is not None:
            self._write_checkpoint(chosen, heldout_q, report)
        from miaotui.optimize.report import write_report

        write_report(cfg.output, report)
        if status == "ok":
            from miaotui.optimize.splits import remove_reference_files

            remove_reference_files(cfg.output / STATE_DIR)
        return OptimizeResult(status, message, chosen.candidate.name if chosen else None, report, cfg.output, code)

    def _gain(self, e: _Entry) -> str:
        base = self.entries.get("source")
        if base is None or base.record is None or e is base or self.cfg.objective == "memory":
            return ""
        return f" ({e.record['speed']['value'] / base.record['speed']['value']:.2f}x the source)"

    def _heldout(self, e: _Entry) -> dict | None:
        """Quality of a candidate on the held-out split (cached like the search results)."""
        c = e.candidate
        key = candidate_key(c.steps, source=self.fingerprint, split=self.splits.split_id("heldout"),
                            calib=[self.cfg.calib, self.cfg.calib_samples, self.cfg.calib_len, self.cfg.seed],
                            heldout=True)
        rec = self.cache.get(key)
        if rec is None:
            built = self._winner_model(c)
            if built is None:
                return None
            self._say(f"held-out check of {c.name} on {self.cfg.heldout_windows} window(s)")
            rec = {"key": key, "name": c.name, "split": "heldout", "quality": quality(built[0], self.splits.heldout)}
            self.cache.put(rec)
        return rec["quality"]

    def _winner_model(self, c: Candidate):
        """(loaded, modules, records) of ``c``: the one kept in memory, or built again."""
        if self.kept is not None and self.kept[0] == c.name:
            return self.kept[1:]
        self._say(f"rebuild {c.name}")
        try:
            loaded, modules, records, _ = build(self.shared, c.steps, c.name)
        except (MiaotuiError, ValueError, RuntimeError) as e:
            self._say(f"  {c.name} could not be rebuilt: {e}")
            return None
        self.kept = (c.name, loaded, modules, records)
        return self.kept[1:]

    def _write_checkpoint(self, e: _Entry, heldout_q: dict, report: dict) -> None:
        from miaotui.loading.checkpoint import save_checkpoint, source_identity

        loaded, modules, records = self._winner_model(e.candidate)
        loaded.model.clear_cache()
        recipe = {"name": e.candidate.name, "steps": e.candidate.steps, "records": records,
                  "optimize": {"budget": str(self.budget), "objective": self.cfg.objective, "report": "report.json"}}
        q = {**heldout_q, "split": "held-out", "budget": str(self.budget), "budget_met": True,
             "search": e.record["quality"], "objective": self.cfg.objective, "speed": e.record["speed"]["value"],
             "speed_unit": e.record["speed"]["unit"]}
        manifest = save_checkpoint(self.cfg.output, loaded.model, loaded.tokenizer, loaded.config, modules, recipe,
                                   source_identity(loaded.path), quality=q)
        report["checkpoint"] = {"path": str(self.cfg.output), "bytes": manifest["weights"]["bytes"],
                                "sha256": manifest["weights"]["sha256"]}

    def _report(self, status, message, stopped, chosen, heldout_q, heldout_rejected) -> dict:
        from miaotui import __version__

        cfg = self.cfg
        rows = []
        for name in self.order:
            e = self.entries[name]
            row = {"name": name, "family": e.candidate.family, "note": e.candidate.note, "steps": e.candidate.steps,
                   "outcome": e.outcome, "from_cache": e.from_cache}
            if e.reason:
                row["reason"] = e.reason
            if e.record is not None:
                rec = e.record
                row.update({k: rec[k] for k in ("key", "status", "error", "quality", "speed", "bytes",
                                                "decode_bytes", "kinds", "build_s", "eval_s", "speed_s", "total_s",
                                                "started_s") if k in rec})
                if rec.get("status") == "measured":
                    row["in_budget"] = e.outcome == "pass"
                    row["failures"] = self.budget.failures(rec["quality"])
            rows.append(row)
        measured = [r for r in rows if r.get("status") == "measured"]
        points = [(self._loss(r), self._score(r)) for r in measured]
        frontier = [measured[i]["name"] for i in pareto_front(points)]
        skipped = [{"name": r["name"], "reason": r.get("reason", "")} for r in rows if r["outcome"].startswith("skipped")]
        skipped += [{"name": e.candidate.name, "reason": e.reason} for n, e in self.entries.items()
                    if n not in self.order]
        if (note := unstructured_note()) is not None:
            skipped.append(note)
        c = self.budget.primary
        return {
            "miaotui_version": __version__, "status": status, "message": message, "stopped": stopped,
            "model": str(self.source.path), "source_fingerprint": self.fingerprint,
            "budget": str(self.budget), "objective": cfg.objective,
            "objective_label": OBJECTIVES[cfg.objective][0], "objective_unit": OBJECTIVES[cfg.objective][1],
            "higher_is_better": OBJECTIVES[cfg.objective][2],
            "quality_axis": {"metric": c.metric, "key": c.key, "op": c.op,
                             "limit_search": c.limit({"reference_perplexity":
                                                      self.splits.reference_perplexity("search")})},
            "data": {"file": self.splits.data, "sha256": self.splits.data_sha256, "ctx": cfg.ctx,
                     "search_windows": cfg.search_windows, "heldout_windows": cfg.heldout_windows,
                     "reference_perplexity_search": self.splits.reference_perplexity("search"),
                     "reference_perplexity_heldout": self.splits.reference_perplexity("heldout")},
            "chosen": chosen.candidate.name if chosen else None,
            "chosen_steps": chosen.candidate.steps if chosen else None,
            "heldout": heldout_q, "heldout_rejected": heldout_rejected,
            "candidates": rows, "frontier": frontier, "skipped": skipped,
            "sensitivity": {k: (v.to_dict() if v is not None else None) for k, v in self.sens.items()},
            "counts": {"built": self.built, "from_cache": sum(1 for r in rows if r["from_cache"]),
                       "measured": len(measured), "skipped": len(skipped)},
            "time": {"limit_s": cfg.time_limit, "spent_s": round(self.elapsed(), 2),
                     "reference_s": round(self.reference_s, 2)},
            "settings": {"speed": self.speed_settings.to_dict(), "families": list(self.families),
                         "sensitivity_windows": cfg.sensitivity_windows, "calib": cfg.calib,
                         "max_candidates": cfg.max_candidates},
        }


def _kinds(modules: dict[str, dict]) -> list[str]:
    kinds = {s["kind"] for name, s in modules.items() if name != "lm_head"}
    return sorted(kinds or {"dense"})


def _dur(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _speed(sp: dict) -> str:
    if sp["unit"] == "MB":
        return f"{sp['value']:.1f} MB/token"
    return f"{sp['value']:.1f} {sp['unit']}"


def _quality(q: dict) -> str:
    parts = [f"ppl {q['perplexity']:.3f}"]
    if q.get("reference_perplexity"):
        parts[0] += f" ({100 * (q['perplexity'] / q['reference_perplexity'] - 1):+.2f}%)"
    if q.get("kld_mean") is not None:
        parts.append(f"KLD {q['kld_mean']:.4g}")
    if q.get("top1_agreement") is not None:
        parts.append(f"top-1 {100 * q['top1_agreement']:.1f}%")
    return ", ".join(parts)


def optimize(cfg: OptimizeConfig, log: Callable[[str], None] | None = None) -> OptimizeResult:
    """Run the search described by ``cfg``; see the module docstring."""
    return Search(cfg, log).run()
