"""``miaotui optimize`` on tiny random models: budgets, the Pareto frontier, per-layer sensitivity, mixed-precision
recipes, and whole searches (held-out check, resume from the cache, time limit, impossible budget)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from miaotui.cli.main import main
from miaotui.compress.quant.qlinear import Int4Linear, Int8Linear
from miaotui.compress.quant.qtensor import quantize_rtn
from miaotui.compress.recipe import Context, RecipeError, run_recipe
from miaotui.loading import load
from miaotui.loading.checkpoint import save_checkpoint, source_identity
from miaotui.optimize.budget import BudgetError, parse_budget
from miaotui.optimize.config import OptimizeError, parse_duration
from miaotui.optimize.pareto import dominates, pareto_front

IDS = torch.tensor([[5, 77, 123, 9, 200, 31, 64, 250, 18, 3, 99, 141]])
# tiny searches: 64-token windows of the WikiText excerpt, 2 to search on, 2 held out
SMALL = ["--ctx", "64", "--search-windows", "2", "--heldout-windows", "2", "--sensitivity-windows", "1",
         "--decode-tokens", "8", "--repeats", "1", "--calib-samples", "4", "--calib-len", "64"]


# ---- budgets


def test_budget_forms_and_checks():
    q = {"perplexity": 20.5, "reference_perplexity": 20.0, "kld_mean": 0.01, "top1_agreement": 0.96}
    assert parse_budget("ppl+3%").met(q)  # 20.5 <= 20.6
    assert not parse_budget("ppl+2%").met(q)  # 20.5 > 20.4
    assert parse_budget("ppl+0.5").met(q) and not parse_budget("ppl+0.4").met(q)
    assert parse_budget("ppl<=21").met(q) and not parse_budget("perplexity <= 20").met(q)
    assert parse_budget("kld<=0.02").met(q) and not parse_budget("kld<=0.005").met(q)
    assert parse_budget("top1>=0.95").met(q) and not parse_budget("top1>=97%").met(q)
    both = parse_budget("ppl+3%, top1>=0.97")
    assert len(both.constraints) == 2 and not both.met(q)
    assert both.failures(q) == ["top1 0.96 >= 0.97"]
    assert both.primary.metric == "ppl" and both.primary.limit(q) == pytest.approx(20.6)
    enc = parse_budget("cosine>=0.99,spearman>=0.98")
    assert enc.for_encoder and enc.met({"mean_cosine": 0.995, "similarity_spearman": 0.99})
    assert not enc.met({"mean_cosine": 0.98, "similarity_spearman": 0.99})
    # nan never meets a budget; violation ranks how far outside
    assert not parse_budget("kld<=1").met({"kld_mean": float("nan")})
    assert parse_budget("kld<=0.01").violation({"kld_mean": 0.02}) == pytest.approx(1.0)


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"), ("speed>=3", "unknown measure"), ("kld>=0.02", "better lower"), ("top1<=0.9", "better higher"),
    ("kld+3%", "only perplexity"), ("top1>=95", "at most 1"), ("ppl", "does not parse"),
    ("ppl+3%,cosine>=0.9", "mixes"), ("ppl<=abc", "does not parse"),
])
def test_budget_errors_are_clear(spec, needle):
    with pytest.raises(BudgetError) as e:
        parse_budget(spec)
    assert needle in str(e.value)


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90 and parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400 and parse_duration("1.5h") == 5400 and parse_duration(12) == 12
    for bad in ("", "soon", "-5m", "0s"):
        with pytest.raises(OptimizeError):
            parse_duration(bad)


# ---- Pareto frontier


def test_pareto_front_hand_points():
    # (loss, speed): lower loss, higher speed are better
    pts = [(0.0, 10.0),   # 0: best quality, slowest: frontier
           (0.1, 20.0),   # 1: frontier
           (0.2, 15.0),   # 2: dominated by 1 (worse and slower)
           (0.1, 20.0),   # 3: identical to 1: neither dominates, both kept
           (0.5, 40.0),   # 4: frontier (fastest)
           (0.6, 40.0),   # 5: dominated by 4 (same speed, worse)
           (0.05, 9.0)]   # 6: dominated by 0
    assert pareto_front(pts) == [4, 1, 3, 0]
    assert pareto_front([]) == []


def test_pareto_front_random_points_property():
    rng = random.Random(0)
    for _ in range(20):
        pts = [(round(rng.random(), 1), round(rng.random(), 1)) for _ in range(rng.randint(1, 25))]
        front = set(pareto_front(pts))
        for i, p in enumerate(pts):
            dominated = any(dominates(q, p) for q in pts)
            assert (i in front) == (not dominated)


# ---- per-layer sensitivity


def test_sensitivity_finds_the_fragile_layer(hf_folder):
    """Layer 1's weights get one huge outlier per row: int4 groups then round everything else to zero, so
    quantizing that layer alone must cost the most KLD; dropping any layer costs something."""
    from miaotui.eval.reference import compute_reference
    from miaotui.optimize.sensitivity import layer_sensitivity

    path, _ = hf_folder("llama-gqa-untied")
    lm = load(path)
    lm.model.fuse()
    with torch.no_grad():
        for lin in (lm.model.model.layers[1].mlp.down_proj, lm.model.model.layers[1].self_attn.o_proj):
            lin.weight[:, 0] = 40 * lin.weight.abs().max()
    windows = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = compute_reference(lm.model, windows)
    before = lm.model(IDS)
    sens = layer_sensitivity(lm.model, ref, "quant")
    assert len(sens.kld) == 2 and all(k > 0 for k in sens.kld)
    assert sens.most_sensitive(1) == [1] and sens.least_sensitive(1) == [0]
    torch.testing.assert_close(lm.model(IDS), before, atol=0, rtol=0)  # weights put back exactly
    drop = layer_sensitivity(lm.model, ref, "drop")
    assert all(k > 1e-4 for k in drop.kld)
    torch.testing.assert_close(lm.model(IDS), before, atol=0, rtol=0)  # hooks removed


# ---- mixed precision in the quantize step


def _compress(folder, steps, out=None):
    lm = load(folder)
    ctx = Context(lm, progress=False)
    run_recipe(ctx, {"name": "mixed", "steps": steps})
    if out is not None:
        save_checkpoint(out, lm.model, lm.tokenizer, lm.config, ctx.modules, {"name": "mixed", "steps": steps},
                        source_identity(lm.path))
    return lm, ctx


def test_mixed_overrides_per_module_bits_manifest_and_reload(hf_folder, tmp_path):
    folder, _ = hf_folder("llama-gqa-untied")
    steps = [{"quantize": {"method": "rtn", "bits": 4, "group_size": 64,
                           "overrides": {"model.layers.1.*": {"bits": 8}, "*.0.mlp.down_proj": {"group_size": 32},
                                         "model.layers.0.self_attn.o_proj": {"skip": True}}}}]
    lm, ctx = _compress(folder, steps, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    mods = manifest["modules"]
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert mods[f"model.layers.1.{name}"]["kind"] == "int8"
    assert mods["model.layers.0.self_attn.qkv_proj"] == {**mods["model.layers.0.self_attn.qkv_proj"],
                                                         "kind": "int4", "group_size": 64}
    assert mods["model.layers.0.mlp.down_proj"]["group_size"] == 32
    assert "model.layers.0.self_attn.o_proj" not in mods  # skipped: stays a float nn.Linear
    assert type(lm.model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert manifest["modules"]["lm_head"]["kind"] == "int8"
    # each module holds exactly its own RTN grid of the source weight
    src = load(folder)
    src.model.fuse()
    for name, bits, group, sym in [("model.layers.1.mlp.down_proj", 8, None, True),
                                   ("model.layers.0.mlp.down_proj", 4, 32, False),
                                   ("model.layers.0.mlp.gate_up_proj", 4, 64, False)]:
        want = quantize_rtn(src.model.get_submodule(name).weight, bits, group, sym).dequantize()
        torch.testing.assert_close(lm.model.get_submodule(name).dequantize(), want, atol=1e-6, rtol=0)
    with torch.inference_mode():
        back = load(tmp_path / "ckpt")
        assert isinstance(back.model.get_submodule("model.layers.1.mlp.down_proj"), Int8Linear)
        assert isinstance(back.model.get_submodule("model.layers.0.mlp.down_proj"), Int4Linear)
        torch.testing.assert_close(back.model(IDS), lm.model(IDS), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_mixed_overrides_calibrated_methods(hf_folder, method):
    folder, _ = hf_folder("llama-gqa-untied")
    lm = load(folder)
    ctx = Context(lm, progress=False)
    ctx.calib_tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run_recipe(ctx, {"steps": [{"quantize": {"method": method, "bits": 4, "group_size": 32,
                                             "overrides": {"model.layers.0.*": {"bits": 8}}}}]})
    kinds = {n: s["kind"] for n, s in ctx.modules.items() if n != "lm_head"}
    assert kinds and all(k == ("int8" if ".0." in n else "int4") for n, k in kinds.items())
    assert all(ctx.modules[n]["group_size"] == 32 for n, k in kinds.items() if k == "int4")


@pytest.mark.parametrize("params,needle", [
    ({"method": "rtn", "overrides": {"model.layers.9.*": {"bits": 8}}}, "match no decoder linear"),
    ({"method": "rtn", "overrides": {"*": {"bits": 8, "group_size": 8}}}, "not a multiple of 16"),
    ({"method": "rtn", "overrides": {"*": {"bits": 3}}}, "bits must be 4 or 8"),
    ({"method": "rtn", "overrides": {"*": {"alpha": 1}}}, "unknown parameter"),
    ({"method": "gptq", "overrides": {"*": {"float_zero": True}}}, "unknown parameter"),
    ({"method": "smoothquant", "overrides": {"*": {"bits": 8}}}, "not supported"),
    ({"method": "rtn", "overrides": {}}, "non-empty mapping"),
    ({"method": "rtn", "bits": 8, "group_size": 128, "symmetric": False}, "symmetric must be true"),
])
def test_override_errors_name_the_parameter(hf_folder, params, needle):
    folder, _ = hf_folder("llama-gqa-untied")
    with pytest.raises(RecipeError) as e:
        _compress(folder, [{"quantize": params}])
    assert needle in str(e.value)


def test_bits8_step_defaults_to_the_int8_format(hf_folder):
    """``bits: 8`` alone (no group_size/symmetric) used to fail in Int8Linear; it now means per-channel int8."""
    folder, _ = hf_folder("llama-gqa-untied")
    _, ctx = _compress(folder, [{"quantize": {"method": "rtn", "bits": 8}}])
    assert {s["kind"] for s in ctx.modules.values()} == {"int8"}


def test_byte_estimate_matches_the_built_model(hf_folder):
    """The search rules candidates out on estimated bytes before building: the estimate must be exact."""
    from miaotui.optimize.candidates import ModelShape, estimate, mixed_steps
    from miaotui.optimize.measure import stored_bytes

    for arch in ("llama-gqa-untied", "llama-mha-tied", "qwen2-bias"):
        folder, _ = hf_folder(arch)
        src = load(folder)
        src.model.fuse()
        shape = ModelShape.of(src.model)
        base = [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]
        int8_groups = [{"quantize": {"method": "rtn", "bits": 8, "group_size": 32, "head_group_size": 16}}]
        for steps in ([], base, [{"quantize": {"method": "rtn", "bits": 8}}], int8_groups,
                      mixed_steps(base, shape.prefix, [1])):
            nbytes, kinds = estimate(shape, steps)
            lm, _ = _compress(folder, steps) if steps else (src, None)
            assert nbytes == stored_bytes(lm.model), (arch, steps)
        assert estimate(shape, mixed_steps(base, shape.prefix, [1]))[1] == {"int4", "int8"}


# ---- whole searches through the CLI


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def search_run(hf_folder, tmp_path_factory):
    """One search whose budget int4 misses and int8 meets, so mixed precision is bisected."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    folder, _ = hf_folder("llama-gqa-untied")
    out = tmp_path_factory.mktemp("opt") / "out"
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = main(["optimize", "-m", str(folder), "--budget", "kld<=0.0001", "-o", str(out),
                     "--families", "uniform,groups,mixed", "--time-limit", "10m", *SMALL])
    return folder, out, code, err.getvalue()


def test_search_chooses_a_candidate_that_meets_the_budget_on_heldout(search_run):
    from miaotui.eval.evaluate import evaluate
    from miaotui.eval.reference import compute_reference
    from miaotui.optimize.splits import make_splits

    folder, out, code, err = search_run
    assert code == 0, err
    r = _report(out)
    assert r["status"] == "ok" and r["chosen"]
    names = {c["name"]: c for c in r["candidates"]}
    assert names["int4-rtn"]["outcome"] == "fail" and names["int8"]["outcome"] == "pass"
    assert any(c["family"] == "mixed" and c.get("status") == "measured" for c in r["candidates"])
    chosen = names[r["chosen"]]
    fastest = max((c for c in r["candidates"] if c.get("in_budget")), key=lambda c: c["speed"]["value"])
    ro = r["runoff"]
    if ro is None:  # no other candidate within the runoff's margin: the search's fastest is chosen
        assert chosen is fastest
    else:  # the fastest and its near rivals were timed again in turns: the best median is chosen
        contenders = {c["name"]: c for c in ro["candidates"]}
        assert fastest["name"] in contenders and len(contenders) >= 2
        assert all(len(c["values"]) == ro["rounds"] for c in contenders.values())
        assert ro["winner"] == r["chosen"] == max(contenders, key=lambda n: contenders[n]["median"])
        assert all(names[n]["in_budget"] for n in contenders) and "runoff" in err
        assert "Runoff" in (out / "report.md").read_text()
    # independently: the written checkpoint, evaluated against the source on the held-out windows
    src = load(folder)
    src.model.fuse()
    splits = make_splits(src, None, 64, 2, 2)
    ckpt = load(out)
    assert ckpt.manifest["recipe"]["name"] == r["chosen"] and ckpt.manifest["quality"]["budget_met"]
    held = evaluate(ckpt, splits.heldout.windows, reference=compute_reference(src.model, splits.heldout.windows))
    assert held.kld_mean <= 1e-4
    assert held.kld_mean == pytest.approx(r["heldout"]["kld_mean"], rel=1e-3, abs=1e-9)
    assert not torch.equal(splits.search.windows[:1], splits.heldout.windows[:1])
    assert (out / "report.md").read_text().count(r["chosen"]) >= 2 and (out / "pareto.png").stat().st_size > 1000
    assert "measure int4-rtn" in err and "within budget" in err


def test_reported_frontier_has_no_dominated_candidate(search_run):
    _, out, _, _ = search_run
    r = _report(out)
    measured = [c for c in r["candidates"] if c.get("status") == "measured"]
    pts = {c["name"]: (c["quality"]["kld_mean"], c["speed"]["value"]) for c in measured}
    assert r["frontier"]
    for name in r["frontier"]:
        assert not any(dominates(p, pts[name]) for p in pts.values()), name
    for name, p in pts.items():  # and every candidate off the frontier is dominated by one on it
        if name not in r["frontier"]:
            assert any(dominates(pts[f], p) for f in r["frontier"]), name


def test_killed_run_resumes_from_its_cache(hf_folder, tmp_path, capsys, monkeypatch):
    import miaotui.optimize.search as search_mod

    folder, _ = hf_folder("llama-mha-tied")
    out = tmp_path / "out"
    built: list[str] = []
    real_build = search_mod.build

    def counting_build(shared, steps, name):
        built.append(name)
        return real_build(shared, steps, name)

    monkeypatch.setattr(search_mod, "build", counting_build)
    args = ["optimize", "-m", str(folder), "--budget", "kld<=0.0001", "-o", str(out), "--families", "uniform,groups",
            *SMALL]
    code, _, err = run_cli(capsys, *args, "--max-candidates", "2")
    first = _report(out)
    assert first["counts"]["built"] == 2 and first["stopped"].startswith("candidate limit")
    measured_first = [c["name"] for c in first["candidates"] if c.get("status") == "measured"]
    assert len(measured_first) == 2
    # the kill: a half-written line at the end of the results file
    with open(out / "search" / "results.jsonl", "a") as f:
        f.write('{"key": "0123", "name": "int4-g3')
    built.clear()
    code, _, err = run_cli(capsys, *args, "--max-candidates", "4")
    second = _report(out)
    assert second["counts"]["built"] == 2 and second["counts"]["from_cache"] == 2
    rows = {c["name"]: c for c in second["candidates"]}
    assert all(rows[n]["from_cache"] for n in measured_first)
    # nothing measured before was built again (the winner may be rebuilt to be written, runoff contenders to
    # be timed again)
    rebuilt_ok = {second["chosen"]} | {c["name"] for c in (second["runoff"] or {}).get("candidates", [])}
    assert not (set(built) - rebuilt_ok) & set(measured_first)
    assert "resuming: 2 candidate result(s)" in err
    # --fresh forgets the cache
    code, _, err = run_cli(capsys, *args, "--max-candidates", "1", "--fresh")
    assert _report(out)["counts"] == {**_report(out)["counts"], "built": 1, "from_cache": 0}


def _loose_search(hf_folder, tmp_path, capsys, monkeypatch, families: str, candidates: int):
    """A search every int4/int8 format passes, with the runoff's margin opened wide: (out, report, stderr)."""
    from miaotui.optimize import runoff

    monkeypatch.setattr(runoff, "MARGIN", 10.0)
    folder, _ = hf_folder("llama-gqa-untied")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "kld<=10", "-o", str(out),
                           "--families", families, "--max-candidates", str(candidates), *SMALL)
    assert code == 0, err
    return out, _report(out), err


def test_runoff_times_the_near_best_again_and_chooses_the_best_median(hf_folder, tmp_path, capsys, monkeypatch):
    """Every int4/int8 format passes a loose budget; with the margin opened wide the three fastest are
    re-timed in turns and the best median is chosen and written."""
    from miaotui.optimize import runoff

    out, r, err = _loose_search(hf_folder, tmp_path, capsys, monkeypatch, "uniform,groups", 4)
    ro = r["runoff"]
    passing = sorted((c for c in r["candidates"] if c.get("in_budget")), key=lambda c: -c["speed"]["value"])
    assert {c["name"] for c in ro["candidates"]} == {c["name"] for c in passing[:runoff.MAX_CONTENDERS]}
    assert all(len(c["values"]) == runoff.ROUNDS and c["median"] > 0 for c in ro["candidates"])
    best = max(ro["candidates"], key=lambda c: c["median"])["name"]
    assert ro["winner"] == best == r["chosen"] == load(out).manifest["recipe"]["name"]
    assert f"→ {best}" in err and f"→ `{best}`" in (out / "report.md").read_text()


def test_runoff_is_skipped_without_the_time_for_it(hf_folder, tmp_path, capsys, monkeypatch):
    from miaotui.optimize import runoff

    monkeypatch.setattr(runoff, "ROUNDS", 10 ** 6)  # a runoff that could never fit the time limit
    out, r, _ = _loose_search(hf_folder, tmp_path, capsys, monkeypatch, "uniform", 3)
    assert r["runoff"]["skipped"].startswith("needs") and "skipped" in (out / "report.md").read_text()
    fastest = max((c for c in r["candidates"] if c.get("in_budget")), key=lambda c: c["speed"]["value"])
    assert r["chosen"] == fastest["name"]  # the search's own timings decide


def test_time_limit_is_respected(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("llama-gqa-untied")
    out = tmp_path / "out"
    limit = 3.0
    code, _, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "kld<=0.05", "-o", str(out),
                           "--time-limit", f"{limit}s", *SMALL)
    r = _report(out)
    measured = [c for c in r["candidates"] if c.get("status") == "measured"]
    assert all(c["started_s"] < limit for c in measured)  # nothing started after the deadline
    timed_out = [s for s in r["skipped"] if s["reason"].startswith("time limit")]
    assert timed_out and "time limit" in (out / "report.md").read_text()
    assert r["status"] in ("ok", "nothing-measured")
    if r["status"] == "ok":  # the baseline fitted: the source is what meets the budget in that time
        assert code == 0 and r["chosen"] == "source"
    else:
        assert code == 2 and "time limit" in err


def test_impossible_budget_names_the_closest_candidate(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("llama-gqa-untied")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "kld<=0", "-o", str(out),
                                "--families", "uniform", *SMALL)
    assert code == 2
    assert "no candidate meets the budget kld<=0" in err and "closest is source" in err
    r = _report(out)
    assert r["status"] == "none-in-budget" and r["chosen"] is None
    assert not (out / "manifest.json").exists() and (out / "report.md").is_file()
    assert "Traceback" not in err


def test_cli_input_errors(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("llama-gqa-untied")
    code, _, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "fast", "-o", str(tmp_path / "o"))
    assert code == 1 and "does not parse" in err and "ppl+3%" in err
    code, _, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "cosine>=0.99", "-o",
                           str(tmp_path / "o"), *SMALL)
    assert code == 1 and "encoder measures" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "ppl+3%", "-o", str(foreign))
    assert code == 1 and "refusing to write" in err
    code, _, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "ppl+3%", "-o", str(tmp_path / "o"),
                           "--time-limit", "soon")
    assert code == 1 and "does not parse" in err


def test_candidates_that_cannot_win_are_not_built(hf_folder, tmp_path, capsys, monkeypatch):
    """int4 at group 128 meets the budget: int4 at group 64/32 (same kernels, more bytes) cannot be faster, so
    they are skipped unbuilt; int8 (other kernels) is still measured."""
    import miaotui.optimize.search as search_mod

    folder, _ = hf_folder("llama-gqa-untied")
    built: list[str] = []
    real_build = search_mod.build
    monkeypatch.setattr(search_mod, "build", lambda shared, steps, name: built.append(name) or
                        real_build(shared, steps, name))
    code, _, err = run_cli(capsys, "optimize", "-m", str(folder), "--budget", "kld<=0.05", "-o", str(tmp_path / "o"),
                           "--families", "uniform,groups", *SMALL)
    r = _report(tmp_path / "o")
    rows = {c["name"]: c for c in r["candidates"]}
    assert code == 0 and rows["int4-rtn"]["outcome"] == "pass"
    for name in ("int4-rtn-g64", "int4-g32"):
        assert rows[name]["outcome"] == "skipped-dominated" and "cannot be faster" in rows[name]["reason"]
        assert name not in built
    assert rows["int8"].get("status") == "measured"
