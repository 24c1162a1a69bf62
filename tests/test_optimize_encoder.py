"""``miaotui optimize`` on BERT-family encoders: a tiny random 4-layer BERT in sentence-transformers layout,
searched for real (held-out check against the source's embeddings, the frontier, resume from the cache, the
time limit, an unreachable budget, the written checkpoint), plus the candidate generator and the per-layer
pieces on their own."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from test_bert import TINY, make_tokenizer

from miaotui.cli.main import main
from miaotui.encoder import Encoder
from miaotui.eval.embeddings import eval_texts
from miaotui.optimize.pareto import dominates

# tiny searches: 12 paragraphs of the WikiText excerpt to search on, the last 8 held out, one timing repeat
SMALL = ["--search-texts", "12", "--heldout-texts", "8", "--sensitivity-texts", "6", "--repeats", "1"]
LAYERS = 4


def make_encoder_folder(path, layers: int = LAYERS):
    """A tiny random BERT saved with sentence-transformers' files (mean pooling, normalised)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**TINY, "num_hidden_layers": layers, "max_position_embeddings": 64},
                                  type_vocab_size=2)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # random init leaves biases/norms at 0/1: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": TINY["hidden_size"], "pooling_mode_mean_tokens": True}))
    return path


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return make_encoder_folder(tmp_path_factory.mktemp("tiny-encoder") / "tiny")


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _report(out):
    return json.loads((out / "report.json").read_text())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def memory_run(encoder_folder, tmp_path_factory):
    """A whole search for the fewest bytes (deterministic, unlike timings) within cosine >= 0.99, with
    --calib text so distillation is a candidate: int4/int8/W8A8, heads and dropped layers are all tried."""
    base = tmp_path_factory.mktemp("opt-enc")
    calib = base / "calib.txt"
    paragraphs, _ = eval_texts(None, limit=None)
    calib.write_text("\n".join(paragraphs[20:70]))  # between the search (first 12) and held-out (last 8) ones
    out = base / "out"
    code, stdout, err = run_cli("optimize", "-m", str(encoder_folder), "--budget", "cosine>=0.99", "-o", str(out),
                                "--objective", "memory", "--calib", str(calib), "--time-limit", "5m", *SMALL)
    return out, code, stdout, err


def test_chosen_candidate_meets_the_budget_on_heldout_and_loads(memory_run, encoder_folder):
    out, code, stdout, err = memory_run
    assert code == 0, err
    r = _report(out)
    assert r["status"] == "ok" and r["kind"] == "encoder" and r["objective_unit"] == "MB"
    rows = {c["name"]: c for c in r["candidates"]}
    chosen = rows[r["chosen"]]
    assert chosen["steps"] and chosen["in_budget"]  # something compressed meets cosine >= 0.99 here
    assert chosen["speed"]["value"] == min(c["speed"]["value"] for c in r["candidates"] if c.get("in_budget"))
    # independently: the written checkpoint against the source on the held-out paragraphs
    paragraphs, _ = eval_texts(None, limit=None)
    heldout = paragraphs[-8:]
    ckpt, src = Encoder(out), Encoder(encoder_folder)
    assert ckpt.loaded.format == "miaotui" and ckpt.loaded.manifest["recipe"]["name"] == r["chosen"]
    assert ckpt.loaded.pooling == src.loaded.pooling  # the sentence-transformers files came along
    cos = _cosines(ckpt.encode(heldout, normalize=False), src.encode(heldout, normalize=False))
    assert cos.mean() >= 0.99 and cos.mean() < 1 - 1e-6  # within budget, and really compressed
    assert cos.mean() == pytest.approx(r["heldout"]["mean_cosine"], abs=1e-5)
    assert ckpt.loaded.manifest["quality"]["budget_met"] and ckpt.loaded.manifest["quality"]["split"] == "held-out"
    # and `miaotui embed --model DIR` runs it
    code, emb_out, _ = run_cli("embed", "--model", str(out), heldout[0])
    assert code == 0
    emb = np.array(json.loads(emb_out.splitlines()[0])["embedding"])
    np.testing.assert_allclose(emb, ckpt.encode(heldout[0]), atol=1e-5)
    md = (out / "report.md").read_text()
    assert md.count(r["chosen"]) >= 2 and "miaotui embed --model" in md and (out / "pareto.png").stat().st_size > 1000


def test_reported_frontier_has_no_dominated_candidate(memory_run):
    out, *_ = memory_run
    r = _report(out)
    measured = [c for c in r["candidates"] if c.get("status") == "measured"]
    pts = {c["name"]: (-c["quality"]["mean_cosine"], -c["speed"]["value"]) for c in measured}  # (loss, "speed")
    assert len(r["frontier"]) >= 2
    for name in r["frontier"]:
        assert not any(dominates(p, pts[name]) for p in pts.values()), name
    for name, p in pts.items():  # every candidate off the frontier is dominated by one on it
        if name not in r["frontier"]:
            assert any(dominates(pts[f], p) for f in r["frontier"]), name


def test_the_search_covers_every_encoder_family(memory_run):
    out, *_ = memory_run
    r = _report(out)
    rows = {c["name"]: c for c in r["candidates"]}
    measured = {n for n, c in rows.items() if c.get("status") == "measured"}
    assert {"source", "bf16", "int8", "int4-rtn", "w8a8"} <= measured
    assert rows["bf16"]["dtype"] == "bf16" and rows["bf16"]["bytes"] < rows["source"]["bytes"] * 0.6
    assert any(n.startswith("prune-heads-") for n in measured)
    # layers are dropped least important first, by the per-layer sensitivity in the report
    sens = r["sensitivity"]["drop"]
    assert sens["measure"] == "1-cosine" and len(sens["scores"]) == LAYERS and min(sens["scores"]) > 0
    dropped = [c for c in rows.values() if c["steps"] and "prune-layers" in c["steps"][0]]
    assert dropped
    first = dropped[0]["steps"][0]["prune-layers"]["layers"]
    assert first == [int(np.argmin(sens["scores"]))]
    # here one dropped layer misses the budget: distillation heals it past the undistilled cut
    distilled = [c for c in rows.values() if c["family"] == "distill" and c.get("status") == "measured"]
    assert distilled, [c["name"] for c in rows.values()]
    d = distilled[0]
    undistilled = next(c for c in dropped if c["steps"][0] == d["steps"][0] and len(c["steps"]) == 1)
    assert undistilled["outcome"] == "fail"
    assert d["quality"]["mean_cosine"] > undistilled["quality"]["mean_cosine"]


def test_killed_run_resumes_from_its_cache(encoder_folder, tmp_path, monkeypatch):
    import miaotui.optimize.encoder_search as search_mod

    out = tmp_path / "out"
    built: list[str] = []
    real_build = search_mod.build_encoder

    def counting_build(shared, steps, name, dtype="fp32"):
        built.append(name)
        return real_build(shared, steps, name, dtype)

    monkeypatch.setattr(search_mod, "build_encoder", counting_build)
    args = ["optimize", "-m", str(encoder_folder), "--budget", "cosine>=0.99", "-o", str(out),
            "--families", "dtype,uniform,calibrated", *SMALL]
    code, _, err = run_cli(*args, "--max-candidates", "2")
    first = _report(out)
    assert first["counts"]["built"] == 2 and first["stopped"].startswith("candidate limit")
    measured_first = [c["name"] for c in first["candidates"] if c.get("status") == "measured"]
    assert measured_first == ["source", "bf16"]
    with open(out / "search" / "results.jsonl", "a") as f:  # the kill: a half-written line at the end
        f.write('{"key": "0123", "name": "int')
    built.clear()
    code, _, err = run_cli(*args, "--max-candidates", "4")
    second = _report(out)
    assert second["counts"]["built"] == 2 and second["counts"]["from_cache"] == 2, err
    rows = {c["name"]: c for c in second["candidates"]}
    assert all(rows[n]["from_cache"] for n in measured_first)
    # only the winner may be rebuilt (to be written), and runoff contenders (to be timed again)
    rebuilt_ok = {second["chosen"]} | {c["name"] for c in (second["runoff"] or {}).get("candidates", [])}
    assert not (set(built) - rebuilt_ok) & set(measured_first)
    assert "resuming: 2 candidate result(s)" in err


def test_runoff_for_latency_chooses_the_lowest_median(encoder_folder, tmp_path, monkeypatch):
    """Latency (lower is better): the near-best are re-timed in turns and the lowest median wins."""
    from miaotui.optimize import runoff

    monkeypatch.setattr(runoff, "MARGIN", 10.0)
    out = tmp_path / "out"
    code, _, err = run_cli("optimize", "-m", str(encoder_folder), "--budget", "cosine>=0.5", "-o", str(out),
                           "--objective", "latency", "--families", "dtype,uniform", "--max-candidates", "3", *SMALL)
    assert code == 0, err
    r = _report(out)
    ro = r["runoff"]
    assert len(ro["candidates"]) >= 2 and all(len(c["values"]) == runoff.ROUNDS for c in ro["candidates"])
    assert ro["winner"] == r["chosen"] == min(ro["candidates"], key=lambda c: c["median"])["name"]
    assert ro["unit"] == "ms"


def test_time_limit_is_respected(encoder_folder, tmp_path):
    out = tmp_path / "out"
    limit = 2.0
    code, _, err = run_cli("optimize", "-m", str(encoder_folder), "--budget", "cosine>=0.99", "-o", str(out),
                           "--objective", "latency", "--time-limit", f"{limit}s", *SMALL)
    r = _report(out)
    measured = [c for c in r["candidates"] if c.get("status") == "measured"]
    assert all(c["started_s"] < limit for c in measured)  # nothing started after the deadline
    assert [s for s in r["skipped"] if s["reason"].startswith("time limit")]
    assert r["time"]["spent_s"] < limit + 10  # the end (held-out check, writing) is all that may overrun
    if r["status"] == "ok":
        assert code == 0 and r["objective_unit"] == "ms"
    else:
        assert code == 2 and r["status"] == "nothing-measured" and "time limit" in err


def test_unreachable_budget_exits_2_naming_the_closest(encoder_folder, tmp_path, monkeypatch):
    """References the source itself cannot reproduce (noise added to them): no candidate can meet the budget."""
    from miaotui.optimize import encoder_splits

    real = encoder_splits.make_text_splits

    def noisy(*args, **kwargs):
        s = real(*args, **kwargs)
        g = np.random.default_rng(0)
        s.search_ref = s.search_ref + 0.5 * g.standard_normal(s.search_ref.shape).astype(np.float32)
        return s

    monkeypatch.setattr(encoder_splits, "make_text_splits", noisy)
    out = tmp_path / "out"
    code, _, err = run_cli("optimize", "-m", str(encoder_folder), "--budget", "cosine>=0.999", "-o", str(out),
                           "--families", "uniform", *SMALL)
    assert code == 2 and "Traceback" not in err
    r = _report(out)
    assert r["status"] == "none-in-budget" and r["chosen"] is None
    measured = [c for c in r["candidates"] if c.get("status") == "measured"]
    closest = max(measured, key=lambda c: c["quality"]["mean_cosine"])
    assert f"no candidate meets the budget cosine>=0.999; the closest is {closest['name']}" in err
    assert not (out / "manifest.json").exists() and (out / "report.md").is_file()


def test_budget_and_objective_must_fit_the_model(encoder_folder, tmp_path):
    code, _, err = run_cli("optimize", "-m", str(encoder_folder), "--budget", "ppl+3%", "-o", str(tmp_path / "a"))
    assert code == 1 and "decoder measures" in err and "cosine>=0.99" in err
    code, _, err = run_cli("optimize", "-m", str(encoder_folder), "--budget", "cosine>=0.99", "-o",
                           str(tmp_path / "b"), "--objective", "decode")
    assert code == 1 and "does not apply to encoders" in err
    code, _, err = run_cli("optimize", "-m", str(encoder_folder), "--budget", "cosine>=0.99", "-o",
                           str(tmp_path / "c"), "--search-texts", "90", "--heldout-texts", "20")
    assert code == 1 and "fewer than 90 search + 20 held-out" in err


# ---- the pieces


def test_w8a8_with_layers_kept_float(encoder_folder):
    from torch import nn

    from miaotui.compress.quant.qlinear import W8A8Linear
    from miaotui.compress.recipe import Context, RecipeError, run_recipe
    from miaotui.kernels.linear import GemvLinear
    from miaotui.loading.encoder import load_encoder
    from miaotui.optimize.encoder_candidates import w8a8_float_layers

    loaded = load_encoder(encoder_folder)
    ctx = Context(loaded, progress=False)
    run_recipe(ctx, {"name": "mixed", "steps": w8a8_float_layers([1, 3])})
    for i, layer in enumerate(loaded.model.layers):
        # a float layer may be prepared for the native few-row kernels (GemvLinear) where they timed faster
        want = (nn.Linear, GemvLinear) if i in (1, 3) else (W8A8Linear,)
        assert type(layer.attention.qkv) in want and type(layer.output) in want, i
    assert len(ctx.modules) == 2 * 4 and all(n.split(".")[1] in ("0", "2") for n in ctx.modules)
    for step, needle in (({"method": "smoothquant", "overrides": {"layers.0.*": {"bits": 4}}}, "only \\{skip: true\\}"),
                         ({"method": "rtn", "bits": 8, "overrides": {"layers.9.*": {"skip": True}}}, "match no encoder")):
        with pytest.raises(RecipeError, match=needle):
            run_recipe(Context(load_encoder(encoder_folder), progress=False), {"name": "x", "steps": [{"quantize": step}]})


def test_layer_sensitivity_leaves_the_source_unchanged(encoder_folder):
    from miaotui.loading.encoder import load_encoder
    from miaotui.optimize.encoder_measure import embed
    from miaotui.optimize.encoder_sensitivity import encoder_layer_sensitivity

    src = load_encoder(encoder_folder)
    src.model.fuse()
    texts = eval_texts(None, limit=6)[0]
    ref = embed(src, texts)
    before = {k: v.clone() for k, v in src.model.state_dict().items()}
    drop, w8a8 = (encoder_layer_sensitivity(src, texts, ref, kind).scores for kind in ("drop", "w8a8"))
    for scores in (drop, w8a8):
        assert len(scores) == LAYERS and all(x > 0 for x in scores), scores
    assert min(drop) > max(w8a8)  # dropping a layer costs far more than quantizing it
    assert all(torch.equal(before[k], v) for k, v in src.model.state_dict().items())
    np.testing.assert_allclose(embed(src, texts), ref, atol=1e-6)


class FakeState:
    """The search as the candidate generator sees it: outcomes decided by a rule, no model."""

    def __init__(self, passes, families=("dtype", "uniform", "calibrated", "mixed", "prune", "distill"),
                 objective="throughput", distill_data=None):
        from miaotui.optimize.sensitivity import Sensitivity

        self.passes, self.families, self.objective, self.distill_data = passes, families, objective, distill_data
        self.seen: list = []
        self.sens = {"w8a8": Sensitivity("w8a8", [0.1, 0.5, 0.2, 0.9, 0.3, 0.05], {}, "1-cosine"),
                     "drop": Sensitivity("drop", [0.3, 0.1, 0.2, 0.6, 0.5, 0.4], {}, "1-cosine")}

    def outcome(self, c):
        hit = [x for x in self.seen if x.name == c.name]
        return ("pass" if self.passes(hit[-1]) else "fail") if hit else None

    def loss(self, name):
        return 0.01

    def record(self, name):
        return {"speed": {"value": {"bf16": 1.0, "source": 2.0}.get(name, 3.0)}}

    def fastest_passing(self, quantized_only=False):
        passing = [c for c in self.seen if self.passes(c) and (c.steps or not quantized_only)]
        return passing[-1] if passing else None

    def sensitivity(self, kind):
        return self.sens[kind]


def _walk(state, n_layers=6, n_heads=12):
    from miaotui.optimize.encoder_candidates import EncoderShape, propose_encoder

    for c in propose_encoder(state, EncoderShape(n_layers, n_heads)):
        state.seen.append(c)
    return state.seen


def test_mixed_w8a8_bisects_the_float_layers():
    """W8A8 fails; keeping the 2 most W8A8-sensitive layers float is the least that passes."""
    def passes(c):
        if c.name == "w8a8":
            return False
        if c.family == "mixed":
            return len(c.steps[0]["quantize"]["overrides"]) >= 2
        return c.family in ("baseline", "dtype", "uniform")

    seen = _walk(FakeState(passes))
    mixed = [c for c in seen if c.family == "mixed"]
    ks = [len(c.steps[0]["quantize"]["overrides"]) for c in mixed]
    assert ks == [3, 1, 2]  # bisection in (0, 6)
    assert set(mixed[-1].steps[0]["quantize"]["overrides"]) == {"layers.1.*", "layers.3.*"}  # 0.5 and 0.9


def test_pruning_chains_stop_at_the_first_miss_and_renumber_float_layers():
    from miaotui.optimize.encoder_candidates import after_dropping, w8a8_float_layers

    def passes(c):
        if c.family == "prune" and c.steps and "prune-layers" in c.steps[0]:
            return len(c.steps[0]["prune-layers"]["layers"]) < 3
        return c.name != "w8a8"

    seen = _walk(FakeState(passes, distill_data="train.txt"))
    names = [c.name for c in seen]
    float_drops = [c for c in seen if c.steps and "prune-layers" in c.steps[0] and len(c.steps) == 1]
    assert [c.steps[0]["prune-layers"]["layers"] for c in float_drops] == [[1], [1, 2], [0, 1, 2]]  # then stop
    assert float_drops[1].parent == float_drops[0].name
    quantized = [c for c in seen if c.family == "prune" and len(c.steps) == 2]
    assert quantized and all(c.parent == c.name.split("+")[0] for c in quantized)  # the same cut, in float
    assert "bf16" in names and not any(n.endswith("+bf16") for n in names)  # bf16 measured slower: not chained
    heads = [c.steps[0]["prune-heads"]["heads"] for c in seen if c.steps and "prune-heads" in c.steps[0]
             and len(c.steps) == 1]
    assert heads == [3, 6]
    distill = [c for c in seen if c.family == "distill"]
    assert len(distill) == 1 and distill[0].steps[1]["distill"]["data"] == "train.txt"
    # a mixed base's float layers follow the stack when layers are dropped below them
    steps = after_dropping(w8a8_float_layers([1, 3, 4]), [0, 3])
    assert set(steps[0]["quantize"]["overrides"]) == {"layers.0.*", "layers.2.*"}
    assert after_dropping(w8a8_float_layers([3]), [3])[0]["quantize"].get("overrides") is None
    # no distillation text: no distillation candidate
    assert not [c for c in _walk(FakeState(passes)) if c.family == "distill"]
