"""Distil a model into a smaller or compressed student that imitates it, and save the student.

Decoders learn the teacher's next-token distribution (KL divergence on temperature-scaled logits, plus an
optional loss on chosen layers' outputs); encoders learn its sentence embeddings (1 - cosine and/or MSE of
the pooled vectors, pooled and normalised as the model's sentence-transformers config says). The student
is either --student DIR (e.g. a pruned checkpoint from `miaotui compress`, whose quantized layers stay frozen
and whose zeroed weights stay zero) or --student-layers: the teacher with only some of its layers.

Training text is --data FILE or, with none, data-free text the default model writes itself (cached in
~/.cache/miaotui/calib). A part of it (--holdout) is never trained on and reports the gain.

examples:
  miaotui distill --student-layers 24 --output out/smol24 --steps 200 --eval
  miaotui distill --model teacher-folder --student out/pruned --output out/healed --data train.txt
  miaotui distill --encoder --student-layers 3 --output out/minilm3 --data paragraphs.txt --eval
  miaotui distill ... --save-every 50          # interrupted? the same command with --resume continues
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STATE_FILE = "distill-state.pt"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="PATH",
                   help="the teacher: a Hugging Face folder, a .gguf file or a miaotui checkpoint; an encoder folder "
                        "for encoders (default: the embedded SmolLM2-135M-Instruct, or all-MiniLM-L6-v2 with "
                        "--encoder)")
    p.add_argument("--encoder", action="store_true",
                   help="the teacher is a BERT-family encoder (detected from the folder's config.json; needed only "
                        "to pick the default encoder when --model is not given)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--student", metavar="DIR",
                   help="the student to train: a checkpoint from `miaotui compress` (or any model of the same "
                        "vocabulary; for encoders a folder with the same tokenizer)")
    g.add_argument("--student-layers", metavar="N|I,J,...",
                   help="build the student from the teacher, keeping N evenly spaced layers (first and last "
                        "included) or exactly the layers listed (0-based)")
    p.add_argument("--teacher-layers", metavar="I,J,...",
                   help="with --student: the teacher layer each student layer came from, for --hidden-loss "
                        "(default: read from the student's recorded recipe, else found by matching weights, else "
                        "evenly spaced)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for the distilled student (a miaotui checkpoint; for encoders a Hugging Face / "
                        "sentence-transformers folder) and the training state")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE",
                   help="training text: decoders cut it into windows of --seq-len tokens; encoders take its "
                        "paragraphs (or lines; .jsonl: \"text\" fields) (default: data-free text written by the "
                        "default model)")
    g.add_argument("--calib-samples", type=int, metavar="N",
                   help="without --data: sequences of 512 data-free tokens to generate and train on (default: 32, "
                        "which are cached; more are generated once, slowly)")
    g.add_argument("--holdout", type=float, default=0.1, metavar="F",
                   help="fraction of the training data kept out of training to measure the result (default: 0.1)")
    g.add_argument("--seq-len", type=int, default=256, metavar="N",
                   help="decoders: tokens per training window (default: 256)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=200, metavar="N", help="optimizer steps (default: 200)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default: 1e-4)")
    g.add_argument("-b", "--batch-size", type=int, default=4, metavar="N",
                   help="windows (decoders) or texts (encoders) per forward pass (default: 4)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="forward passes whose gradients are summed into one optimizer step: an effective batch "
                        "of batch-size x N in the memory of one (default: 1)")
    g.add_argument("--warmup", type=int, metavar="N",
                   help="steps of linear learning-rate warmup before the cosine decay (default: 10%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="W", help="AdamW weight decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, metavar="N",
                   help="clip the gradient's global norm to this; 0 = no clipping (default: 1)")
    g.add_argument("-T", "--temperature", type=float, default=2.0, metavar="T",
                   help="decoders: softmax temperature of the KL loss; the loss is scaled by T² (default: 2)")
    g.add_argument("--hidden-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="weight of the hidden-state loss: squared error of each student layer's output against "
                        "the teacher layer it came from, relative to that state's size; 0 = off (default: 0)")
    g.add_argument("--cosine-loss", type=float, default=1.0, metavar="WEIGHT",
                   help="encoders: weight of 1 - cosine between student and teacher embeddings (default: 1)")
    g.add_argument("--mse-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="encoders: weight of the MSE between student and teacher embeddings (default: 0)")
    g.add_argument("--train-embeddings", action="store_true",
                   help="also train the token embeddings (and an output head tied to them); frozen by default")
    g.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the data order and the held-out split (default: 0)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help=f"save the training state (weights, optimizer, step) to DIR/{STATE_FILE} every N steps; "
                        "it is also saved on Ctrl-C (default: 0 = only then)")
    g.add_argument("--resume", action="store_true",
                   help=f"continue from DIR/{STATE_FILE}: same command, same settings; the result equals an "
                        "uninterrupted run's")
    g.add_argument("--keep-state", action="store_true",
                   help="keep the training state after a finished run (by default it is deleted: it holds the "
                        "optimizer's moments, twice the trained weights' size)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true",
                   help="evaluate the student against the teacher before and after, on --eval-data (decoders: "
                        "perplexity, KL divergence, top-1 agreement; encoders: cosine and similarity-rank "
                        "correlation), and record it in the output")
    g.add_argument("--eval-data", metavar="FILE",
                   help="text for --eval (default: the WikiText excerpt; encoders use its paragraphs)")
    g.add_argument("--ctx", type=int, default=512, metavar="N",
                   help="decoders: --eval window length in tokens (default: 512)")
    g.add_argument("--windows", type=int, default=20, metavar="N", help="decoders: --eval windows (default: 20)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line: the run's report")


def _log(s: str) -> None:
    print(f"[distill] {s}", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace):
    from miaotui.compress.distill import DistillConfig

    return DistillConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seq_len=args.seq_len, temperature=args.temperature, hidden_loss=args.hidden_loss,
                         cosine_loss=args.cosine_loss, mse_loss=args.mse_loss, warmup=args.warmup,
                         weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, holdout=args.holdout,
                         seed=args.seed, save_every=args.save_every, train_embeddings=args.train_embeddings)


def _check_output(out: Path, resume: bool) -> None:
    from miaotui.compress.distill import DistillError

    ours = {"manifest.json", "distill.json", STATE_FILE}
    if out.exists() and any(out.iterdir()) and not any((out / f).is_file() for f in ours):
        raise DistillError(f"{out} exists and holds no miaotui output: refusing to write into it", "output")
    if resume and not (out / STATE_FILE).is_file():
        raise DistillError(f"--resume: {out / STATE_FILE} does not exist (run with --save-every, or interrupt "
                              "with Ctrl-C, to leave one)", "resume")


def _is_encoder(args: argparse.Namespace) -> bool:
    if args.model is None:
        return args.encoder
    cfg = Path(args.model).expanduser() / "config.json"
    if not cfg.is_file():
        return args.encoder
    from miaotui.models.bert import ENCODER_TYPES

    try:
        return json.loads(cfg.read_text()).get("model_type") in ENCODER_TYPES
    except (json.JSONDecodeError, UnicodeDecodeError):
        return args.encoder


def run(args: argparse.Namespace) -> int:
    import torch

    from miaotui.compress.distill import DistillError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.student is None and args.student_layers is None:
        raise DistillError("say what to train: --student DIR or --student-layers N", "student")
    if args.teacher_layers is not None and args.student is None:
        raise DistillError("--teacher-layers describes a --student DIR; --student-layers already names them",
                           "teacher_layers")
    out = Path(args.output)
    _check_output(out, args.resume)
    cfg = _config(args)  # bad hyper-parameters fail before anything is loaded
    result = _run_encoder(args, cfg, out) if _is_encoder(args) else _run_decoder(args, cfg, out)
    state = out / STATE_FILE
    if state.is_file() and not args.keep_state:
        state.unlink()
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def _summary(report: dict, kind: str) -> None:
    b, a = report.get("before") or {}, report.get("after") or {}
    for key in ("kl", "perplexity", "mean_cosine", "similarity_spearman"):
        if key in b and key in a:
            _log(f"held-out {kind} {key}: {b[key]:.4f} -> {a[key]:.4f}")


def _student_origin(args: argparse.Namespace, records: list[dict], student, teacher, n_teacher: int):
    """The teacher layer each layer of a --student came from: --teacher-layers, else its recorded recipe,
    else matching weights; None when unknown (the hidden-state loss then pairs layers evenly)."""
    from miaotui.compress.distill import DistillError
    from miaotui.compress.distill.student import blocks, kept_layers_from_records, match_layers, parse_layers

    n_student = len(blocks(student))
    if args.teacher_layers is not None:
        try:  # always indices: a lone "3" is layer 3, not "3 evenly spaced" as in --student-layers
            keep = parse_layers([int(x) for x in args.teacher_layers.split(",") if x.strip()], n_teacher)
        except ValueError:
            raise DistillError(f"--teacher-layers: {args.teacher_layers!r} is not a list of integers",
                               "teacher_layers") from None
        if len(keep) != n_student:
            raise DistillError(f"--teacher-layers names {len(keep)} layers; the student has {n_student}",
                               "teacher_layers")
        return keep
    keep = kept_layers_from_records(records, n_teacher)
    return keep if keep is not None and len(keep) == n_student else match_layers(student, teacher)


def _run_decoder(args: argparse.Namespace, cfg, out: Path) -> dict:
    import dataclasses

    from miaotui.compress.calib import calibration_tokens
    from miaotui.compress.distill import distill, layer_map, layer_subset
    from miaotui.compress.distill.data import cut_windows, file_windows
    from miaotui.compress.distill.student import blocks, config_layer_key, parse_layers
    from miaotui.loading import load
    from miaotui.loading.checkpoint import save_checkpoint, source_identity, update_quality

    progress = sys.stderr.isatty()
    teacher = load(args.model, "fp32", progress=progress)
    teacher.model.fuse()
    n_teacher = len(blocks(teacher.model))
    records, modules, prev_steps, source = [], {}, [], source_identity(teacher.path)
    if args.student_layers is not None:
        keep = parse_layers(args.student_layers, n_teacher)
        student = dataclasses.replace(teacher, model=layer_subset(teacher.model, keep),
                                      config={**teacher.config, config_layer_key(teacher.config): len(keep)})
        _log(f"student: {len(keep)} of the teacher's {n_teacher} layers ({', '.join(map(str, keep))})")
    else:
        student = load(args.student, "fp32", progress=progress)
        student.model.fuse()
        if student.manifest:
            recipe = student.manifest.get("recipe") or {}
            records, prev_steps = list(recipe.get("records") or []), list(recipe.get("steps") or [])
            modules, source = dict(student.manifest.get("modules") or {}), student.manifest.get("source") or source
        keep = _student_origin(args, records, student.model, teacher.model, n_teacher)
        _log(f"student: {args.student} ({len(blocks(student.model))} layers; teacher {n_teacher})")
    if cfg.hidden_loss and keep is not None:
        cfg.layer_map = layer_map(keep)
    if args.data:
        windows = file_windows(args.data, teacher.tokenizer, cfg.seq_len)
    else:
        windows = cut_windows(calibration_tokens(teacher, None, args.calib_samples, None, 0, progress=True),
                              cfg.seq_len)
    _log(f"data: {windows.shape[0]} windows of {cfg.seq_len} tokens from {args.data or 'data-free text'}")
    ev_windows = reference = quality_before = None
    if args.eval:
        from miaotui.eval.data import text_windows
        from miaotui.eval.evaluate import evaluate
        from miaotui.eval.reference import compute_reference

        ev_windows, _ = text_windows(teacher.tokenizer, args.eval_data, args.ctx, args.windows)
        reference = compute_reference(teacher.model, ev_windows, progress=progress)
        quality_before = evaluate(student, ev_windows, reference=reference, name="before").to_dict()
        _log(f"before: perplexity {quality_before['perplexity']:.3f}, KLD {quality_before['kld_mean']:.4f}")
    report = distill(student.model, teacher.model, windows, cfg, state_path=out / STATE_FILE, resume=args.resume,
                     progress=True)
    record = {"step": "distill", "params": cfg.to_dict() | {"data": args.data or "data-free"}, **report.to_dict(),
              "teacher_layers": keep, "student_layers": len(blocks(student.model)), "source_layers": n_teacher}
    _summary(record, "windows")
    prev_name = (student.manifest or {}).get("recipe", {}).get("name")
    recipe = {"name": f"{prev_name}+distill" if prev_name else "distill",
              "steps": prev_steps + [{"distill": record["params"]}], "records": records + [record]}
    student.model.eval().requires_grad_(False)
    save_checkpoint(out, student.model, student.tokenizer, student.config, modules, recipe, source)
    _log(f"wrote {out}")
    quality = None
    if args.eval:
        from miaotui.compress.quant.qlinear import prepare_quantized
        from miaotui.eval.data import default_data_path

        prepare_quantized(student.model)
        quality = evaluate(student, ev_windows, reference=reference, name="distilled").to_dict()
        quality.update(data=Path(args.eval_data or default_data_path()).name, reference="teacher (fp32)",
                       before={k: quality_before[k] for k in ("perplexity", "kld_mean", "top1_agreement")})
        update_quality(out, quality)
        _log(f"after: perplexity {quality['perplexity']:.3f}, KLD {quality['kld_mean']:.4f} "
             f"(teacher: {quality['reference_perplexity']:.3f})")
    return {"output": str(out), "kind": "decoder", "distill": record, "quality": quality}


def _run_encoder(args: argparse.Namespace, cfg, out: Path) -> dict:
    from miaotui.compress.distill import distill_encoder, encoder_subset, layer_map
    from miaotui.compress.distill.data import data_free_texts, read_texts
    from miaotui.compress.distill.encoder import embedding_metrics, tokenize_texts
    from miaotui.compress.distill.encoder_save import read_record, save_encoder
    from miaotui.compress.distill.student import parse_layers
    from miaotui.loading.encoder import load_encoder

    teacher = load_encoder(args.model)
    teacher.model.fuse()
    n_teacher = len(teacher.model.layers)
    records, prev_name = [], None
    if args.student_layers is not None:
        keep = parse_layers(args.student_layers, n_teacher)
        student = encoder_subset(teacher, keep)
        _log(f"student: {len(keep)} of the teacher's {n_teacher} layers ({', '.join(map(str, keep))})")
    else:
        student = load_encoder(args.student)
        student.model.fuse()
        previous = (read_record(args.student) or {}).get("recipe") or {}
        records, prev_name = list(previous.get("records") or []), previous.get("name")
        keep = _student_origin(args, records, student.model, teacher.model, n_teacher)
        _log(f"student: {args.student} ({len(student.model.layers)} layers; teacher {n_teacher})")
    if cfg.hidden_loss and keep is not None:
        cfg.layer_map = layer_map(keep)
    texts = read_texts(args.data) if args.data else data_free_texts(progress=True)
    _log(f"data: {len(texts)} texts from {args.data or 'data-free text'}")
    ev = before = None
    if args.eval:
        from miaotui.eval.data import default_data_path

        ev_texts = read_texts(args.eval_data or default_data_path())
        ev = tokenize_texts(teacher, ev_texts)
        before = embedding_metrics(student, teacher, *ev)
        _log(f"before: mean cosine {before['mean_cosine']:.4f} on {len(ev_texts)} texts")
    report = distill_encoder(student, teacher, texts, cfg, state_path=out / STATE_FILE, resume=args.resume,
                             progress=True)
    record = {"step": "distill", "params": cfg.to_dict() | {"data": args.data or "data-free"}, **report.to_dict(),
              "teacher_layers": keep, "student_layers": len(student.model.layers), "source_layers": n_teacher}
    _summary(record, "texts")
    quality = None
    if args.eval:
        quality = {**embedding_metrics(student, teacher, *ev), "before": before,
                   "data": Path(args.eval_data).name if args.eval_data else "wikitext excerpt (paragraphs)"}
        _log(f"after: mean cosine {quality['mean_cosine']:.4f}")
    from miaotui.loading.checkpoint import source_identity

    recipe = {"name": f"{prev_name}+distill" if prev_name else "distill", "records": records + [record]}
    save_encoder(out, student, {"recipe": recipe,
                                "source": source_identity(teacher.path), "quality": quality})
    _log(f"wrote {out}")
    return {"output": str(out), "kind": "encoder", "distill": record, "quality": quality}
