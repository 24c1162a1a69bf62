"""The search loop every model kind shares: candidates in order, the result cache, the time limit, the choice,
its held-out check and the report. ``search.py`` (decoders) and ``encoder_search.py`` (encoders) subclass
``SearchLoop`` with what differs: loading the source and its splits, building and measuring a candidate,
the held-out measure and writing the checkpoint.

1. Candidates come from the subclass's generator in order; the generator reads each outcome before
   proposing the next (``candidates.SearchState``).
2. A candidate found in ``DIR/search/results.jsonl`` (``cache.py``) is not measured again; one that cannot
   win (``cannot_win``) or whose estimated cost would overrun the time limit (``CostModel``) is skipped
   before it is built; any other is built, measured and its result appended to the cache at once.
3. The winner is the fastest candidate within budget on the search split (the near-best re-timed head to
   head first: ``runoff.py``) that still meets the budget on the held-out split (else the next fastest); it
   is written to DIR as a normal checkpoint, with ``report.md``, ``report.json`` and ``pareto.png``
   (``report.py``). No candidate within budget: exit 2,
   the closest one named.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miaotui.errors import MiaotuiError
from miaotui.optimize.budget import Budget, parse_budget
from miaotui.optimize.cache import ResultCache, candidate_key
from miaotui.optimize.candidates import Candidate
from miaotui.optimize.config import OptimizeConfig, OptimizeError
from miaotui.optimize.pareto import pareto_front
from miaotui.optimize.runoff import run_runoff
from miaotui.optimize.sensitivity import Sensitivity

STATE_DIR = "search"  # DIR/search: results, sensitivity, the source's reference outputs
RESULTS = "results.jsonl"
SENSITIVITY = "sensitivity.json"
CHECKPOINT_FILES = ("manifest.json", "model.safetensors")
DEFAULT_PRIOR = 4.0  # build cost of an unknown step kind, in evaluations of the search split


class CostModel:
    """Seconds a candidate will take: build (per step kind, learned from the ones measured; before that a
    prior in units of one evaluation of the search split) + evaluation + speed measurement."""

    def __init__(self, prior_build: dict[str, float]):
        self.prior = prior_build
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
            priors = [self.prior.get(k, DEFAULT_PRIOR) for k in kinds]
            for k, p in zip(kinds, priors):
                self.build[k] = build_s * p / sum(priors)

    def estimate(self, c: Candidate) -> float:
        if self.unit is None:
            return 0.0  # nothing measured yet: the baseline always starts (it calibrates this model)
        build = sum(self.build.get(k, self.prior.get(k, DEFAULT_PRIOR) * self.unit) for k in c.step_kinds())
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
class Entry:
    """One candidate as the search saw it."""

    candidate: Candidate
    outcome: str  # pass | fail | error | skipped-time | skipped-dominated | skipped-parent
    record: dict | None = None
    reason: str = ""
    from_cache: bool = False


Built = tuple  # (loaded model, module map, step records): what a subclass's build returns, kept for the winner


class SearchLoop:
    """One run. Subclasses set ``kind``, ``objectives`` and ``prior_build`` and implement the hooks below;
    the loop implements ``candidates.SearchState`` for their candidate generators."""

    kind = "model"
    objectives: dict[str, tuple[str, str, bool]] = {}  # objective → (what is measured, unit, higher is better)
    prior_build: dict[str, float] = {}

    def __init__(self, cfg: OptimizeConfig, log: Callable[[str], None] | None = None):
        if cfg.objective not in self.objectives:
            raise OptimizeError(f"objective {cfg.objective!r} does not apply to {self.kind}s "
                                f"(choose from {', '.join(self.objectives)})")
        self.cfg = cfg
        self.budget: Budget = parse_budget(cfg.budget)
        self.families = tuple(cfg.families)
        self.log = log or (lambda s: print(f"[optimize] {s}", file=sys.stderr, flush=True))
        self.entries: dict[str, Entry] = {}
        self.order: list[str] = []
        self.costs = CostModel(self.prior_build)
        self.sens: dict[str, Sensitivity | None] = {}
        self.kept: tuple[str, Built] | None = None  # (name, built) of the best in budget: no rebuild to write it
        self.runoff: dict[str, Any] | None = None  # the near-best re-timed head to head (runoff.py)
        self.built = 0  # candidates built in this run (not from the cache)
        self.taken = 0  # candidates measured or read from the cache
        self.reference_s = 0.0
        self.t0 = time.monotonic()
        self.bar = None

    # ---- hooks

    def prepare(self) -> None:
        """Load the source, cut the splits, compute the reference; set ``source``, ``fingerprint``."""
        raise NotImplementedError

    def propose(self) -> Iterator[Candidate]:
        raise NotImplementedError

    def _calib(self) -> list:
        cfg = self.cfg
        return [cfg.calib, cfg.calib_samples, cfg.calib_len, cfg.seed]

    def search_key(self) -> dict[str, Any]:
        """What a search result depends on besides the recipe: the split, objective, speed settings and
        calibration (subclasses set ``splits`` and ``speed_settings`` in ``prepare``)."""
        return {"split": self.splits.split_id("search"), "objective": self.cfg.objective,
                "speed": self.speed_settings.to_dict(), "calib": self._calib()}

    def heldout_key(self) -> dict[str, Any]:
        return {"split": self.splits.split_id("heldout"), "calib": self._calib()}

    def build(self, c: Candidate) -> tuple[Built, float]:
        """``c`` built on a fresh copy of the source: ``((loaded, modules, records), seconds)``."""
        raise NotImplementedError

    def measure(self, c: Candidate, built: Built) -> tuple[dict[str, Any], float, float]:
        """``({"quality", "speed", "bytes", "kinds", ...}, eval seconds, speed seconds)`` on the search split."""
        raise NotImplementedError

    def heldout_quality(self, built: Built) -> dict:
        raise NotImplementedError

    def time_speed(self, c: Candidate, built: Built) -> float:
        """The objective's figure for ``c`` alone (no quality): one timing of the runoff (``runoff.py``)."""
        raise NotImplementedError

    def write_checkpoint(self, e: Entry, built: Built, heldout_q: dict) -> dict:
        """Write the chosen model to the output folder; returns the manifest."""
        raise NotImplementedError

    def describe_quality(self, q: dict) -> str:
        raise NotImplementedError

    def cannot_win(self, c: Candidate) -> tuple[str, str] | None:
        """(outcome, reason) for a candidate that cannot beat one already measured; None to measure it."""
        return None

    def sensitivity_plan(self, kind: str) -> tuple[list, float, str]:
        """(what the result depends on, estimated seconds, what is measured) for ``compute_sensitivity``."""
        raise NotImplementedError

    def compute_sensitivity(self, kind: str) -> Sensitivity:
        raise NotImplementedError

    def choice_note(self, e: Entry) -> str:
        """Anything the user must know to run the chosen checkpoint as it was measured."""
        return ""

    def report_extra(self) -> dict[str, Any]:
        """The kind's own report fields (``data``, ``settings``, ``quality_axis`` limit, ...)."""
        return {}

    def skipped_notes(self) -> list[dict[str, str]]:
        """Families not searched at all, with the reason (the report lists them as skipped)."""
        return []

    # ---- SearchState

    def outcome(self, c: Candidate) -> str | None:
        e = self.entries.get(c.name)
        return e.outcome if e else None

    def loss(self, name: str) -> float | None:
        e = self.entries.get(name)
        if e is None or e.record is None or e.outcome not in ("pass", "fail"):
            return None
        return self._loss(e.record)

    def record(self, name: str) -> dict | None:
        """The measured record of a candidate (None if not measured)."""
        e = self.entries.get(name)
        return e.record if e is not None and e.outcome in ("pass", "fail") else None

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
        return v if self.objectives[self.cfg.objective][2] else -v

    # ---- time

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.cfg.time_limit - self.elapsed()

    def heldout_share(self) -> float:
        """The held-out split's size over the search split's (the held-out check's cost in evaluations)."""
        return 1.0

    def reserve(self) -> float:
        """Time kept for the end: the held-out check of the winner and writing it."""
        if self.costs.unit is None:
            return 0.0
        return self.costs.unit * self.heldout_share() * 1.2 + 5.0

    # ---- the run

    def run(self) -> OptimizeResult:
        self._prepare_output()
        self.log(f"budget {self.budget} · objective {self.cfg.objective} · time limit {dur(self.cfg.time_limit)}")
        self.prepare()
        state = self.cfg.output / STATE_DIR
        self.cache = ResultCache(state / RESULTS)
        if len(self.cache):
            held = sum(1 for r in self.cache.records.values() if r.get("split") == "heldout")
            self.log(f"resuming: {len(self.cache) - held} candidate result(s) and {held} held-out check(s) "
                     f"cached in {state / RESULTS}")
        self._progress_bar()
        stopped = ""
        try:
            stopped = self._loop()
        finally:
            if self.bar is not None:
                self.bar.close()
        return self._finish(stopped)

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

    def tick(self) -> None:
        if self.bar is None:
            return
        self.bar.n = min(int(self.elapsed()), self.bar.total)
        best = self.fastest_passing()
        best_txt = "-"
        if best is not None:
            best_txt = f"{best.name} {speed_text(self.entries[best.name].record['speed'])}"
        tried = sum(1 for e in self.entries.values() if e.record is not None)
        self.bar.set_postfix_str(f"tried {tried} · best {best_txt} · {dur(max(self.left(), 0))} left")

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[optimize] {text}", file=sys.stderr)
        else:
            self.log(text)

    def _loop(self) -> str:
        gen = self.propose()
        for c in gen:
            if c.name in self.entries:  # proposed twice (e.g. the same base by two routes)
                continue
            if self.cfg.max_candidates is not None and self.taken >= self.cfg.max_candidates:
                gen.close()
                return f"candidate limit ({self.cfg.max_candidates}) reached"
            self.order.append(c.name)
            self._take(c)
            self.tick()
        return ""

    def key(self, c: Candidate) -> str:
        return candidate_key(c.steps, source=self.fingerprint, **self.search_key(), **_variant(c))

    def _take(self, c: Candidate) -> None:
        key = self.key(c)
        rec = self.cache.get(key)
        if rec is not None:
            self.taken += 1
            self._enter(c, rec, from_cache=True)
            return
        reason = self._cannot_win(c)
        if reason:
            self.entries[c.name] = Entry(c, reason[0], reason=reason[1])
            self.say(f"skip {c.name}: {reason[1]}")
            return
        est = self.costs.estimate(c)
        if self.elapsed() + est + self.reserve() > self.cfg.time_limit:
            self.entries[c.name] = Entry(c, "skipped-time", reason=f"time limit: needs ~{dur(est)}, "
                                                                   f"{dur(max(self.left(), 0))} left")
            self.say(f"skip {c.name}: {self.entries[c.name].reason}")
            return
        self.taken += 1
        rec = self._measure(c, key)
        self.cache.put(rec)
        self._enter(c, rec, from_cache=False)

    def _cannot_win(self, c: Candidate) -> tuple[str, str] | None:
        if c.parent is not None and self.outcome(Candidate(c.parent, [], "")) in ("fail", "error"):
            return "skipped-parent", f"compresses further than {c.parent}, which already misses the budget"
        return self.cannot_win(c)

    def _measure(self, c: Candidate, key: str) -> dict:
        started = self.elapsed()
        what = json.dumps(c.steps) if c.steps else "the source as is"
        what += "".join(f", {v}" for v in _variant(c).values())
        self.say(f"measure {c.name}: {c.note if c.note and len(what) > 160 else what}")
        rec: dict[str, Any] = {"key": key, "name": c.name, "family": c.family, "note": c.note,
                               "steps": c.steps, **_variant(c), "started_s": round(started, 2)}
        try:
            built, build_s = self.build(c)
            self.built += 1
            fields, eval_s, speed_s = self.measure(c, built)
        except (MiaotuiError, ValueError, RuntimeError) as e:  # a step that refuses this model, a bad shape
            rec.update(status="error", error=f"{type(e).__name__}: {e}", total_s=round(self.elapsed() - started, 2))
            self.say(f"  {c.name} failed: {rec['error']}")
            return rec
        rec.update(status="measured", **fields, build_s=round(build_s, 2), eval_s=round(eval_s, 2),
                   speed_s=round(speed_s, 2), total_s=round(self.elapsed() - started, 2),
                   records=[{k: v for k, v in r.items() if k in ("step", "seconds", "modules", "kinds")}
                            for r in built[2]])
        self.costs.learn(c, build_s, eval_s, speed_s)
        if self.budget.met(rec["quality"]) and self._beats_kept(rec):
            self.kept = (c.name, built)  # the winner-to-be stays in memory: no rebuild
        del built
        if rec["bytes"] > 50e6:  # a full collection costs ~0.2 s in a big process: only worth it for big models
            gc.collect()
        return rec

    def _beats_kept(self, rec: dict) -> bool:
        if self.kept is None:
            return True
        kept = self.entries.get(self.kept[0])
        return kept is None or kept.record is None or self._score(rec) > self._score(kept.record)

    def _enter(self, c: Candidate, rec: dict, from_cache: bool) -> None:
        if rec.get("status") != "measured":
            self.entries[c.name] = Entry(c, "error", rec, reason=rec.get("error", ""), from_cache=from_cache)
            return
        if from_cache:
            # a cached result still teaches the cost model what this machine takes
            self.costs.learn(c, rec.get("build_s", 0.0), rec.get("eval_s", 0.0), rec.get("speed_s", 0.0))
        met = self.budget.met(rec["quality"])
        self.entries[c.name] = Entry(c, "pass" if met else "fail", rec, from_cache=from_cache)
        verdict = "within budget" if met else "misses: " + "; ".join(self.budget.failures(rec["quality"]))
        self.say(f"  {c.name}{' (cached)' if from_cache else ''}: {self.describe_quality(rec['quality'])} · "
                 f"{speed_text(rec['speed'])}{_bytes(rec)} · {verdict}")

    # ---- sensitivity

    def _sensitivity(self, kind: str) -> Sensitivity | None:
        ident, est, what = self.sensitivity_plan(kind)
        key = hashlib.sha256(json.dumps([kind, self.fingerprint, *ident]).encode()).hexdigest()[:16]
        path = self.cfg.output / STATE_DIR / SENSITIVITY
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if key in stored:
            return Sensitivity.from_dict(stored[key])
        if self.elapsed() + est + self.reserve() > self.cfg.time_limit:
            name = f"sensitivity ({kind})"
            self.entries[name] = Entry(Candidate(name, [], "sensitivity"), "skipped-time",
                                       reason=f"time limit: needs ~{dur(est)}")
            self.say(f"skip per-layer sensitivity ({kind}): needs ~{dur(est)}, {dur(max(self.left(), 0))} left")
            return None
        self.say(f"sensitivity: {what}")
        t = time.monotonic()
        sens = self.compute_sensitivity(kind)
        sens.settings["seconds"] = round(time.monotonic() - t, 2)
        stored[key] = sens.to_dict()
        path.write_text(json.dumps(stored, indent=1))
        top = sens.most_sensitive(min(3, len(sens.scores)))
        top.sort(key=lambda i: -sens.scores[i])
        self.say(f"  most sensitive layers: {top} ({sens.measure} {', '.join(f'{sens.scores[i]:.3g}' for i in top)})")
        return sens

    # ---- the end: choose, check on held-out, write

    def _finish(self, stopped: str) -> OptimizeResult:
        cfg = self.cfg
        measured = [e for e in self.entries.values() if e.record is not None and e.outcome in ("pass", "fail")]
        passing = sorted((e for e in measured if e.outcome == "pass"), key=lambda e: -self._score(e.record))
        passing, self.runoff = run_runoff(self, passing)
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
            self.say(f"{e.candidate.name} misses the budget on the held-out split "
                     f"({'; '.join(self.budget.failures(q))}): trying the next")
        if chosen is not None:
            status, code = "ok", 0
            message = (f"chose {chosen.candidate.name}: {speed_text(chosen.record['speed'])}{self._gain(chosen)}"
                       f"{self._runoff_note(chosen)}{_bytes(chosen.record, ',')}; "
                       f"held-out {self.describe_quality(heldout_q)} (budget {self.budget}) → {cfg.output}"
                       f"{self.choice_note(chosen)}")
            if not chosen.candidate.steps and not _variant(chosen.candidate):
                message = ("no compressed candidate meets the budget: the source itself is the fastest within "
                           f"it; written unchanged to {cfg.output}")
        else:
            closest = min(measured, key=lambda e: self.budget.violation(e.record["quality"]), default=None)
            code = 2
            if not measured:
                status = "nothing-measured"
                message = ("no candidate was measured within the time limit "
                           f"({dur(cfg.time_limit)}): give a longer --time-limit")
            elif passing:
                status = "heldout-failed"
                message = (f"every candidate within budget on the search split missed it on the held-out split "
                           f"(budget {self.budget}); closest: {heldout_rejected[0]['name']}")
            else:
                status = "none-in-budget"
                c = closest.record
                message = (f"no candidate meets the budget {self.budget}; the closest is {closest.candidate.name} "
                           f"({'; '.join(self.budget.failures(c['quality']))}; {speed_text(c['speed'])}). "
                           "Loosen the budget or allow more time/families")
            for f in CHECKPOINT_FILES:  # no stale checkpoint from an earlier run may pass for this result
                (cfg.output / f).unlink(missing_ok=True)
        report = self._report(status, message, stopped, chosen, heldout_q, heldout_rejected)
        if chosen is not None:
            built = self.rebuild(chosen.candidate)
            manifest = self.write_checkpoint(chosen, built, heldout_q)
            report["checkpoint"] = {"path": str(cfg.output), "bytes": manifest["weights"]["bytes"],
                                    "sha256": manifest["weights"]["sha256"]}
        from miaotui.optimize.report import write_report

        write_report(cfg.output, report)
        if status == "ok":
            self.finished_ok()
        return OptimizeResult(status, message, chosen.candidate.name if chosen else None, report, cfg.output, code)

    def finished_ok(self) -> None:
        """After a successful search: drop what is cheap to recompute (large reference files)."""

    def _gain(self, e: Entry) -> str:
        base = self.entries.get("source")
        if base is None or base.record is None or e is base or not self.objectives[self.cfg.objective][2]:
            return ""
        return f" ({e.record['speed']['value'] / base.record['speed']['value']:.2f}x the source)"

    def _runoff_note(self, e: Entry) -> str:
        ro = self.runoff
        if not ro or ro.get("skipped") or ro["winner"] != e.candidate.name:
            return ""
        rivals = [c for c in ro["candidates"] if c["name"] != ro["winner"]]
        return (f" [runoff median {ro['candidates'][0]['median']:.4g} {ro['unit']} vs "
                + ", ".join(f"{c['name']} {c['median']:.4g}" for c in rivals) + "]")

    def _heldout(self, e: Entry) -> dict | None:
        """Quality of a candidate on the held-out split (cached like the search results)."""
        c = e.candidate
        key = candidate_key(c.steps, source=self.fingerprint, **self.heldout_key(), **_variant(c), heldout=True)
        rec = self.cache.get(key)
        if rec is None:
            built = self.rebuild(c)
            if built is None:
                return None
            self.say(f"held-out check of {c.name}")
            rec = {"key": key, "name": c.name, "split": "heldout", "quality": self.heldout_quality(built)}
            self.cache.put(rec)
        return rec["quality"]

    def rebuild(self, c: Candidate) -> Built | None:
        """``c`` built: the one kept in memory, or built again (then kept instead)."""
        if self.kept is not None and self.kept[0] == c.name:
            return self.kept[1]
        self.say(f"rebuild {c.name}")
        try:
            built, _ = self.build(c)
        except (MiaotuiError, ValueError, RuntimeError) as e:
            self.say(f"  {c.name} could not be rebuilt: {e}")
            return None
        self.kept = (c.name, built)
        return built

    def checkpoint_quality(self, e: Entry, heldout_q: dict) -> dict:
        """The manifest's quality record of the chosen candidate."""
        return {**heldout_q, "split": "held-out", "budget": str(self.budget), "budget_met": True,
                "search": e.record["quality"], "objective": self.cfg.objective, "speed": e.record["speed"]["value"],
                "speed_unit": e.record["speed"]["unit"]}

    def _report(self, status, message, stopped, chosen, heldout_q, heldout_rejected) -> dict:
        from miaotui import __version__

        cfg = self.cfg
        rows = []
        for name in self.order:
            e = self.entries[name]
            row = {"name": name, "family": e.candidate.family, "note": e.candidate.note, "steps": e.candidate.steps,
                   **_variant(e.candidate), "outcome": e.outcome, "from_cache": e.from_cache}
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
        skipped = [{"name": r["name"], "reason": r.get("reason", "")} for r in rows
                   if r["outcome"].startswith("skipped")]
        skipped += [{"name": e.candidate.name, "reason": e.reason} for n, e in self.entries.items()
                    if n not in self.order]
        skipped += self.skipped_notes()
        c = self.budget.primary
        objective = self.objectives[cfg.objective]
        report = {
            "miaotui_version": __version__, "kind": self.kind, "status": status, "message": message,
            "stopped": stopped, "model": str(self.source.path), "source_fingerprint": self.fingerprint,
            "budget": str(self.budget), "objective": cfg.objective,
            "objective_label": objective[0], "objective_unit": objective[1], "higher_is_better": objective[2],
            "quality_axis": {"metric": c.metric, "key": c.key, "op": c.op, "limit_search": c.value},
            "chosen": chosen.candidate.name if chosen else None,
            "chosen_steps": chosen.candidate.steps if chosen else None,
            "heldout": heldout_q, "heldout_rejected": heldout_rejected, "runoff": self.runoff,
            "candidates": rows, "frontier": frontier, "skipped": skipped,
            "sensitivity": {k: (v.to_dict() if v is not None else None) for k, v in self.sens.items()},
            "counts": {"built": self.built, "from_cache": sum(1 for r in rows if r["from_cache"]),
                       "measured": len(measured), "skipped": len(skipped)},
            "time": {"limit_s": cfg.time_limit, "spent_s": round(self.elapsed(), 2),
                     "reference_s": round(self.reference_s, 2)},
        }
        extra = self.report_extra()
        report["quality_axis"].update(extra.pop("quality_axis", {}))
        report.update(extra)
        return report


def _variant(c: Candidate) -> dict[str, Any]:
    """What distinguishes a candidate besides its steps (an encoder's dtype), in keys and records."""
    dtype = getattr(c, "dtype", "fp32")
    return {"dtype": dtype} if dtype != "fp32" else {}


def _bytes(rec: dict, sep: str = " ·") -> str:
    """`` · 12.3 MB`` of stored weights, unless the objective's figure already is bytes."""
    return "" if rec["speed"]["unit"] == "MB" else f"{sep} {rec['bytes'] / 1e6:.1f} MB"


def dur(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def speed_text(sp: dict) -> str:
    if sp["unit"] == "MB":
        per_token = "/token" if sp.get("objective") == "memory" and "decode_bytes" in sp else ""
        return (f"{sp['value']:.1f}" if sp["value"] >= 100 else f"{sp['value']:.3g}") + f" MB{per_token}"
    if sp["unit"] == "ms":
        return f"{sp['value']:.2f} ms"
    return f"{sp['value']:.1f} {sp['unit']}"
