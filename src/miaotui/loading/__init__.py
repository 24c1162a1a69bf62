"""Turn a path (HF folder, GGUF file, or nothing for the embedded default) into a ready model + tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from miaotui.errors import MiaotuiError, ModelLoadError
from miaotui.defaults import default_model_path
from miaotui.models import CausalLM, model_class

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any
    config: dict
    path: Path
    format: str  # "gguf" | "hf" | "miaotui" (a compressed checkpoint)
    stored_types: dict[str, int] = field(default_factory=dict)  # tensor count per on-disk type
    eos_token_ids: set[int] = field(default_factory=set)
    manifest: dict | None = None  # a compressed checkpoint's manifest.json

    @property
    def context_length(self) -> int:
        return self.model.max_seq_len


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MiaotuiError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present, nothing unexplained, every shape equal: one clear error otherwise."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise ModelLoadError(f"weights missing for {len(missing)} parameter(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise ModelLoadError(f"{len(unexpected)} unexpected weight(s), e.g. {', '.join(unexpected[:3])}")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelLoadError(f"{name}: shape {tuple(t.shape)} does not match the config's {tuple(expected[name].shape)}")


def build_model(cfg: dict, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> CausalLM:
    """Instantiate the architecture on the meta device and assign the weights (no double allocation)."""
    cls = model_class(cfg.get("model_type"))
    with torch.device("meta"):
        model = cls.from_config(cfg)
    sd = cls.convert_hf_state_dict(sd, cfg)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    tied = getattr(model.args, "tie_word_embeddings", False)
    expected = dict(model.state_dict())
    if tied:
        sd.pop("lm_head.weight", None)  # like transformers, a tied head ignores any stored copy
        expected.pop("lm_head.weight")
    check_state_dict(sd, expected)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers()
    return model.eval().requires_grad_(False)


def _as_list(x) -> list:
    return x if isinstance(x, list) else [] if x is None else [x]


def _eos_ids(cfg: dict, tokenizer) -> set[int]:
    ids = set(_as_list(cfg.get("eos_token_id")))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load(path: str | Path | None = None, dtype: str | torch.dtype = "fp32", progress: bool = False) -> LoadedModel:
    """Load a decoder: a Hugging Face folder, a GGUF file, or (``None``) the embedded default model; a
    compressed checkpoint. An encoder folder or checkpoint (BERT family) comes back as a ``LoadedEncoder``."""
    path = Path(path).expanduser() if path is not None else default_model_path()
    dtype = resolve_dtype(dtype)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    from miaotui.loading.checkpoint import is_checkpoint, load_checkpoint

    if is_checkpoint(path):
        return load_checkpoint(path, dtype, progress)
    from miaotui.loading.encoder import is_encoder_folder, load_encoder

    if is_encoder_folder(path):  # BERT family: a LoadedEncoder (body, heads, sentence-transformers pooling)
        return load_encoder(path, dtype, progress)
    if path.is_dir():
        from miaotui.loading.hf import load_hf_weights, read_hf_config, weight_dtypes
        from miaotui.loading.tokenizer import load_hf_tokenizer

        cfg = read_hf_config(path)
        model_class(cfg["model_type"])  # fail on the architecture before reading gigabytes
        sd = load_hf_weights(path, dtype, progress)
        tokenizer, fmt, types = load_hf_tokenizer(path), "hf", weight_dtypes(path)
        gen_cfg = path / "generation_config.json"
        if gen_cfg.is_file():  # chat models often list extra end-of-turn ids only here
            import json

            extra = _as_list(json.loads(gen_cfg.read_text()).get("eos_token_id"))
            cfg = {**cfg, "eos_token_id": sorted(set(_as_list(cfg.get("eos_token_id"))) | set(extra))}
    else:
        from miaotui.loading.gguf import gguf_tensor_types, load_gguf, read_gguf_config
        from miaotui.loading.gguf_tokenizer import load_gguf_tokenizer

        model_class(read_gguf_config(path).get("model_type"))
        cfg, sd = load_gguf(path, dtype, progress)
        tokenizer, fmt, types = load_gguf_tokenizer(path), "gguf", gguf_tensor_types(path)
    model = build_model(cfg, sd, dtype)
    return LoadedModel(model, tokenizer, cfg, path, fmt, types, _eos_ids(cfg, tokenizer))
