"""Compress a model with a recipe and save a checkpoint that every verb loads directly.

Built-in recipes: int8 (weight-only GPTQ with a scale per 128 columns, the head's per 32; encoders: RTN
per channel), int4-rtn, int4-gptq, int4-awq (int4, group 128, asymmetric; a group that does not divide a
layer's width becomes the largest divisor below it), w8a8-smoothquant, int4-g32 (RTN, group 32, float
zero point: lossless on weights that came from a GGUF Q4_1 file, like the embedded default model's). Each
also stores the output head in int8. Or a YAML file:

  name: my-int4
  steps:
    - quantize: {method: gptq, bits: 4, group_size: 64, act_order: true, percdamp: 0.01}

Steps a YAML recipe chains, in order (each step's quality is recorded in the manifest with --eval):
  prune           {method: magnitude|wanda|sparsegpt, sparsity: 0.5 | pattern: "2:4", allocation: uniform|owl}
                  (zeros in dense weights: smaller after compression, no faster on a CPU)
  prune-heads     {heads_per_group: 1 | kv_groups: 1 | fraction: 0.33}   attention heads, GQA-aware
  prune-channels  {fraction: 0.25 | keep: 1152, multiple_of: 32}        MLP intermediate channels
  prune-layers    {count: 6 | fraction: 0.2 | layers: [...], method: influence|angular}
  lowrank         {ratio: 0.5 | energy: 0.95 | rank: 64, whiten: true}  activation-aware truncated SVD
  distill         {steps: 200, lr: 1e-4, temperature: 2.0, hidden_loss: 1.0, data: FILE}   heal vs the source
  quantize        {method: rtn|gptq|awq|smoothquant, bits: 4|8, group_size: 128, overrides: {GLOB: {bits: 8}}}
                  (bits 8: symmetric, group_size null = per output channel, or a multiple of 16;
                  head: int8|none; head_group_size: the int8 head's group, default the step's with bits 8)
e.g. steps: [{prune-layers: {count: 6}}, {distill: {steps: 300}}, {quantize: {method: gptq, bits: 4}}]

GPTQ, AWQ and SmoothQuant calibrate on --calib FILE, or, with none, on text the model generates itself
from fixed seed prompts (data-free, cached in ~/.cache/miaotui/calib).

An encoder folder (BERT family, e.g. all-MiniLM-L6-v2) takes the same recipes: int8 (weight-only),
int4-rtn, w8a8-smoothquant (int8 activations per token), and YAML chains with prune-heads / prune-layers /
distill; --eval then records embedding quality (mean / min cosine, similarity Spearman) instead.

examples:
  miaotui compress --recipe int8 --output out/int8
  miaotui compress --model path/to/all-MiniLM-L6-v2 --recipe w8a8-smoothquant --output out/minilm-w8a8 --eval
  miaotui compress --recipe int4-gptq --output out/int4 --eval --bench --plot out/int4.png
  miaotui generate --model out/int4 "The capital of France is"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_args(p: argparse.ArgumentParser) -> None:
    from miaotui.compress.recipe import BUILTIN

    p.add_argument("-m", "--model", metavar="PATH",
                   help="source: a Hugging Face folder or .gguf file, or an encoder folder (BERT family) "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("-r", "--recipe", default="int4-gptq", metavar="NAME|FILE",
                   help=f"a built-in recipe ({', '.join(BUILTIN)}) or a YAML recipe file (default: int4-gptq)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the checkpoint to")
    g = p.add_argument_group("calibration (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT, structured pruning, low-rank, distill)")
    g.add_argument("--calib", metavar="FILE", help="text file to calibrate on (default: data-free, self-generated)")
    g.add_argument("--calib-samples", type=int, metavar="N",
                   help="calibration sequences (default: 128 from a file, fewer self-generated ones)")
    g.add_argument("--calib-len", type=int, metavar="N", help="tokens per calibration sequence (default: 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for picking/generating calibration text (default: 0)")
    g = p.add_argument_group("what to do with the result")
    g.add_argument("--eval", action="store_true",
                   help="evaluate against the source (perplexity, KL divergence, top-1 agreement; encoders: "
                        "embedding cosine and similarity Spearman on the lines of --data) and record the report "
                        "in manifest.json")
    g.add_argument("--data", metavar="FILE", help="text for --eval (default: the WikiText excerpt)")
    g.add_argument("--ctx", type=int, default=512, help="--eval window length in tokens (default: 512)")
    g.add_argument("--windows", type=int, default=20, help="--eval windows (default: 20)")
    g.add_argument("--bench", action="store_true",
                   help="benchmark decode and prefill of the source and the checkpoint in one run (and llama.cpp "
                        "on a GGUF source when miaotui[peers] is installed)")
    g.add_argument("--compile", action="store_true", help="--bench: compile the decode step of both")
    g.add_argument("--export", choices=["hf"], help="also write a dequantized Hugging Face folder to DIR/hf")
    g.add_argument("--plot", metavar="FILE.png", help="--bench: write a chart of speed and quality")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: PyTorch's choice)")
    g.add_argument("--json", action="store_true", help="end stdout with one JSON line: the manifest and results")


def run(args: argparse.Namespace) -> int:
    import torch

    from miaotui.compress.recipe import Calibration, Context, load_recipe, run_recipe
    from miaotui.loading import load
    from miaotui.loading.checkpoint import save_checkpoint, source_identity, update_quality

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)  # fail on a bad recipe before loading anything
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        from miaotui.errors import MiaotuiError

        raise MiaotuiError(f"{out} exists and is not a miaotui checkpoint: refusing to write into it")
    from miaotui.loading.encoder import is_encoder_folder

    if args.model and is_encoder_folder(Path(args.model).expanduser()):  # BERT family: encoder/compress.py
        from miaotui.encoder.compress import compress_encoder

        return compress_encoder(args, recipe, out)
    progress = sys.stderr.isatty()
    loaded = load(args.model, "fp32", progress=progress)
    log = lambda s: print(f"[compress] {s}", file=sys.stderr, flush=True)  # noqa: E731
    source_bytes = sum(p.numel() * 4 for p in {id(p): p for p in loaded.model.parameters()}.values())
    reference = windows = None
    if args.eval:
        from miaotui.eval.data import text_windows
        from miaotui.eval.reference import compute_reference

        windows, _ = text_windows(loaded.tokenizer, args.data, args.ctx, args.windows)
        log(f"reference: the source on {windows.shape[0]} windows of {windows.shape[1]} tokens")
        reference = compute_reference(loaded.model, windows, progress=progress)
    ctx = Context(loaded, Calibration(args.calib, args.calib_samples, args.calib_len, args.seed), progress=True)
    if args.eval and len(recipe["steps"]) > 1:  # a chain: record what each step cost on the way
        ctx.step_eval = lambda lm, w=windows, r=reference: _step_quality(lm, w, r)
    log(f"recipe {recipe['name']}: {json.dumps(recipe['steps'])}")
    records = run_recipe(ctx, recipe)
    recipe_record = {**recipe, "records": records}
    manifest = save_checkpoint(out, loaded.model, loaded.tokenizer, loaded.config, ctx.modules, recipe_record,
                               source_identity(loaded.path))
    log(f"wrote {out} ({manifest['weights']['bytes'] / 1e6:.1f} MB of weights)")
    if args.export == "hf":
        from miaotui.loading.export import export_hf

        export_hf(loaded.model, loaded.config, loaded.tokenizer, out / "hf")
        log(f"wrote {out / 'hf'} (dequantized, loads in transformers)")
    quality = None
    if args.eval:
        from miaotui.compress.quant.qlinear import prepare_quantized
        from miaotui.eval.evaluate import evaluate

        prepare_quantized(loaded.model)  # evaluate the kernels that will run
        report = evaluate(loaded, windows, reference=reference, progress=progress, name=recipe["name"])
        from miaotui.eval.data import default_data_path

        report.data, report.reference = Path(args.data or default_data_path()).name, "source (fp32)"
        quality = report.to_dict()
        update_quality(out, quality)
    del loaded, reference
    bench = None
    if args.bench:
        bench = _bench(args, out)
    from miaotui.compress.report import print_report

    print_report(manifest, quality, bench, source_bytes, plot=args.plot, as_json=args.json)
    return 0


def _step_quality(loaded, windows, reference) -> dict:
    from miaotui.eval.evaluate import evaluate

    r = evaluate(loaded, windows, reference=reference, progress=False).to_dict()
    return {k: r[k] for k in ("perplexity", "kld_mean", "top1_agreement") if k in r}


def _bench(args: argparse.Namespace, out: Path) -> dict:
    from miaotui.cli.bench import collect
    from miaotui.defaults import default_model_path

    source = args.model or str(default_model_path())
    engines = [f"miaotui:fp32@{source}", f"miaotui:fp32@{out}"]
    if source.endswith(".gguf"):  # collect() skips it, with the reason, when llama-cpp-python is absent
        engines.append("llama.cpp")
    bench_args = argparse.Namespace(model=source, engines=",".join(engines), threads=args.threads or os.cpu_count(),
                                    compile=args.compile, prefill="512", decode_tokens=128, repeats=3,
                                    concurrency="", data=None)
    return collect(bench_args)
