"""Show what a model is: architecture, parameters, stored and compute dtypes, bytes, context, quantization
and tokenizer."""

from __future__ import annotations

import argparse
import json

from miaotui.cli.common import add_model_args


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def describe(loaded) -> dict:
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    params = {id(p): p for p in model.parameters()}.values()  # tied weights count once
    quantized = {k: v for k, v in loaded.stored_types.items() if k not in ("F32", "F16", "BF16", "F64")}
    return {
        "path": str(loaded.path),
        "format": loaded.format,
        "architecture": type(model).__name__,
        "model_type": cfg.get("model_type"),
        "parameters": sum(p.numel() for p in params),
        "file_bytes": sum(f.stat().st_size for f in ([loaded.path] if loaded.path.is_file()
                                                     else loaded.path.glob("*.safetensors"))),
        "memory_bytes": sum(p.numel() * p.element_size() for p in params),
        "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "stored_types": loaded.stored_types,
        "quantization": quantized or None,
        "context_length": loaded.context_length,
        "layers": len(model.attention_layers()),
        "hidden_size": cfg.get("hidden_size") or cfg.get("n_embd"),
        "attention_heads": cfg.get("num_attention_heads") or cfg.get("n_head"),
        "kv_heads": model.kv_shape()[0],
        "head_dim": model.kv_shape()[1],
        "tied_embeddings": bool(getattr(model.args, "tie_word_embeddings", False)),
        "tokenizer": {
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "bos": tok.bos_token, "eos": tok.eos_token,
            "eos_token_ids": sorted(loaded.eos_token_ids),
            "chat_template": bool(getattr(tok, "chat_template", None)),
        },
    }


def run(args: argparse.Namespace) -> int:
    from miaotui.cli.common import load_llm

    info = describe(load_llm(args).loaded)
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0
