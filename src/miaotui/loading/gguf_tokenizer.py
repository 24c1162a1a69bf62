"""A GGUF file's tokenizer as a transformers tokenizer, converted once and then loaded from a disk cache."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from miaotui.errors import ModelLoadError
from miaotui.loading.gguf_file import read_header

_TOKENIZER_CACHE_VERSION = 1  # bump when what we store changes


def _cache_root() -> Path:
    if root := os.environ.get("MIAOTUI_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "miaotui"


def _tokenizer_cache_key(path: Path) -> str:
    import transformers

    st = path.stat()
    ident = f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}\0{_TOKENIZER_CACHE_VERSION}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _tokenizer_fingerprint(tok) -> tuple:
    probe = "Hello, world! <|im_start|>user\n  héllo 123</s>"
    return (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.chat_template, tok.encode(probe))


def load_gguf_tokenizer(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The file's tokenizer as a transformers tokenizer, converted once and then loaded from a cache.

    transformers converts a GGUF vocabulary in ~7 s (the BPE merges); the result is saved under
    ``cache_dir`` (default ``$MIAOTUI_CACHE/tokenizers`` or ``~/.cache/miaotui/tokenizers``) keyed by
    the file's name, size and mtime and the transformers version, and loads from there in well under 1 s.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    header, _ = read_header(path)  # a clear error for a missing or broken file
    root = Path(cache_dir) if cache_dir is not None else _cache_root() / "tokenizers"
    target = root / _tokenizer_cache_key(path)
    if target.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(target))
        except (OSError, ValueError):  # a damaged entry: convert again and replace it
            shutil.rmtree(target, ignore_errors=True)

    if "tokenizer.ggml.model" not in header.metadata:
        raise ModelLoadError(f"{path}: the GGUF file has no tokenizer metadata")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, TypeError, NotImplementedError, OSError) as e:
        raise ModelLoadError(f"{path}: cannot build a tokenizer from the GGUF metadata ({e})") from e
    if tok.chat_template is None and isinstance(header.metadata.get("tokenizer.chat_template"), str):
        tok.chat_template = header.metadata["tokenizer.chat_template"]
    _save_tokenizer(tok, target)
    return tok


def _save_tokenizer(tok, target: Path) -> None:
    """Save to a temporary folder, check it loads back the same, then rename it into place (atomic)."""
    from transformers import AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    except OSError:
        return  # a read-only cache only costs speed
    try:
        tok.save_pretrained(str(tmp))
        if _tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tmp))) == _tokenizer_fingerprint(tok):
            os.replace(tmp, target)
        else:
            logging.getLogger(__name__).warning("%s: the saved tokenizer loads back differently; not cached", target)
    except OSError:
        pass  # another process won the rename, or the disk is full: the converted tokenizer still works
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
