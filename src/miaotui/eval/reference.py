"""The reference side of KLD / top-1: a model run on the fly, or its log-probs saved once and reused.

File format: one safetensors file holding, for every scored token, the reference's full-vocabulary
log-probs in fp16, its argmax (int32, exact) and the token windows themselves (int32), with the key in the
metadata: reference model fingerprint, data sha256, ctx, first scored row, windows, vocab size.

Why full-vocab fp16 log-probs: KLD needs the whole distribution (a top-k file would have to approximate the
tail, which is where quantization error hides), and fp16 keeps log-probs near 0, where p is large, to
~2^-12 relative. On load each row is renormalised in fp64, so the rounding enters KLD only at second order:
SmolLM2 against its own saved reference measures KLD 4e-7 mean, 1.1e-6 p99 (20 windows), ~1e-4 of the int8
target, and never negative (llama.cpp's uint16 format, read as is, has first-order noise of either sign).
The argmax is stored exactly because fp16 can tie near-equal top tokens.
Cost: 2 bytes × vocab per scored token (SmolLM2: 25 MB per 512-token window), hence a capped window count.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from miaotui.errors import MiaotuiError
from miaotui.eval.perplexity import default_first, window_logits
from miaotui.models import CausalLM

FORMAT = "miaotui-eval-reference"
VERSION = "1"


class ReferenceFileError(MiaotuiError):
    """A reference-logits file is unreadable, corrupt, or was made for another model/data/ctx."""


def model_fingerprint(path: str | Path) -> str:
    """A quick identity of a model file or folder: names, sizes and the first/last MiB of each file
    (hashing gigabytes per eval would cost more than the eval)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()


def tokens_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


class ModelReference:
    """A reference model evaluated on the fly on the same windows (exact: nothing is rounded)."""

    def __init__(self, model: CausalLM, windows: torch.Tensor, first: int | None = None):
        self.model, self.windows = model, windows
        self.first = default_first(windows.shape[1]) if first is None else first

    def log_probs(self, w0: int, w1: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = window_logits(self.model, self.windows[w0:w1], self.first)
        logits = logits.reshape(-1, logits.shape[-1]).float()
        return torch.log_softmax(logits.double(), -1), logits.argmax(-1)


@dataclass
class ReferenceLogits:
    """Saved reference log-probs: rows are the scored tokens of every window, window by window."""

    windows: torch.Tensor  # (W, ctx) int64
    first: int
    lp16: torch.Tensor  # (W*S, V) fp16 log-probs, S = ctx-1-first
    top1: torch.Tensor  # (W*S,) int64
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def rows_per_window(self) -> int:
        return self.windows.shape[1] - 1 - self.first

    @property
    def name(self) -> str:
        return self.meta.get("reference", "reference logits")

    def log_probs(self, w0: int, w1: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.rows_per_window
        lp = self.lp16[w0 * s:w1 * s]
        return torch.log_softmax(lp.double(), -1), self.top1[w0 * s:w1 * s]

    def subset(self, n: int) -> "ReferenceLogits":
        """The first ``n`` windows (their rows are the file's first rows)."""
        if n > self.windows.shape[0]:
            raise ReferenceFileError(f"{n} windows asked for, but the reference logits hold only "
                                     f"{self.windows.shape[0]}")
        s = self.rows_per_window
        return ReferenceLogits(self.windows[:n], self.first, self.lp16[:n * s], self.top1[:n * s],
                               {**self.meta, "windows": str(n)})

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"windows": self.windows.to(torch.int32).contiguous(), "log_probs": self.lp16.contiguous(),
                   "top1": self.top1.to(torch.int32).contiguous()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={**self.meta, "format": FORMAT, "version": VERSION})
        tmp.replace(path)  # never leave a half-written reference under the real name

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceLogits":
        """Read a saved reference; anything that is not a complete, consistent one is a ReferenceFileError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ReferenceFileError(f"{path}: no such reference-logits file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ReferenceFileError(f"{path}: not a miaotui reference-logits file")
                if meta.get("version") != VERSION:
                    raise ReferenceFileError(f"{path}: reference-logits format version {meta.get('version')} "
                                             f"is not supported (expected {VERSION}); save it again")
                names = set(f.keys())
                missing = {"windows", "log_probs", "top1"} - names
                if missing:
                    raise ReferenceFileError(f"{path}: corrupt reference-logits file (missing {', '.join(sorted(missing))})")
                windows, lp16, top1 = (f.get_tensor(k) for k in ("windows", "log_probs", "top1"))
        except ReferenceFileError:
            raise
        except Exception as e:  # safetensors reports truncation/garbage as several exception types
            raise ReferenceFileError(f"{path}: unreadable or corrupt reference-logits file ({e})") from None
        corrupt = ReferenceFileError(f"{path}: corrupt reference-logits file (shapes, metadata and tokens disagree)")
        try:
            first = int(meta["first"])
        except (KeyError, ValueError):
            raise corrupt from None
        if windows.dim() != 2 or lp16.dim() != 2 or lp16.dtype != torch.float16:
            raise corrupt
        (n, ctx), rows = windows.shape, windows.shape[0] * (windows.shape[1] - 1 - first)
        if (lp16.shape[0] != rows or tuple(top1.shape) != (rows,) or str(ctx) != meta.get("ctx")
                or str(n) != meta.get("windows") or str(lp16.shape[1]) != meta.get("vocab")
                or meta.get("tokens_sha256") != tokens_sha256(windows)):
            raise corrupt
        return cls(windows.long(), first, lp16, top1.long(), meta)

    def check(self, *, ctx: int | None = None, first: int | None = None, data_sha256: str | None = None,
              fingerprint: str | None = None, vocab: int | None = None, source: str = "the reference logits") -> None:
        """Raise a ReferenceFileError naming the first thing this run does differently."""
        m = self.meta
        if fingerprint is not None and m.get("fingerprint") != fingerprint:
            raise ReferenceFileError(f"{source} were computed from {m.get('reference')!r}, a different model "
                                     f"than the --reference given now")
        if ctx is not None and ctx != self.windows.shape[1]:
            raise ReferenceFileError(f"{source} were computed with --ctx {self.windows.shape[1]}, this run uses {ctx}")
        if first is not None and first != self.first:
            raise ReferenceFileError(f"{source} score from position {self.first}, this run from {first}")
        if data_sha256 and m.get("data_sha256") and m["data_sha256"] != data_sha256:
            raise ReferenceFileError(f"{source} were computed on other data (sha256 {m.get('data_sha256', '?')[:12]}…, "
                                     f"this run's data is {data_sha256[:12]}…)")
        if vocab is not None and vocab != self.lp16.shape[1]:
            raise ReferenceFileError(f"{source} have a vocabulary of {self.lp16.shape[1]} tokens, the model {vocab}")

    def check_windows(self, windows: torch.Tensor, source: str = "the reference logits") -> "ReferenceLogits":
        """This reference restricted to ``windows`` (which must be its first windows, token for token)."""
        ref = self.subset(windows.shape[0]) if windows.shape[0] != self.windows.shape[0] else self
        if windows.shape != ref.windows.shape or not torch.equal(windows, ref.windows):
            raise ReferenceFileError(f"{source} were computed on other token ids (another tokenizer or data)")
        return ref


def compute_reference(model: CausalLM, windows: torch.Tensor, first: int | None = None, *,
                      meta: dict[str, str] | None = None, batch_size: int | None = None,
                      progress: bool = False) -> ReferenceLogits:
    """Run the reference once over ``windows`` and keep its log-probs in the file format (in memory).

    ``meta`` names what it was computed from, checked when the file is reused: ``reference`` (a display
    name), ``fingerprint`` (``model_fingerprint`` of its path), ``data`` and ``data_sha256``."""
    from tqdm import tqdm

    from miaotui.eval.perplexity import batch_size_for

    n, ctx = windows.shape
    first = default_first(ctx) if first is None else first
    bs = batch_size or batch_size_for(ctx)
    src = ModelReference(model, windows, first)
    lps, tops = [], []
    for w0 in tqdm(range(0, n, bs), desc="reference", unit="batch", disable=not progress, leave=False):
        lp, top = src.log_probs(w0, min(n, w0 + bs))
        lps.append(lp.to(torch.float16))
        tops.append(top)
    lp16 = torch.cat(lps)
    meta = {"reference": "", "fingerprint": "", "data": "", "data_sha256": "", **(meta or {}), "ctx": str(ctx),
            "first": str(first), "windows": str(n), "vocab": str(lp16.shape[1]),
            "tokens_sha256": tokens_sha256(windows)}
    return ReferenceLogits(windows, first, lp16, torch.cat(tops), meta)


def cache_key(fingerprint: str, data_sha256: str, ctx: int, first: int, windows: int) -> str:
    ident = json.dumps([VERSION, fingerprint, data_sha256, ctx, first, windows])
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def default_cache_path(key: str) -> Path:
    """``$MIAOTUI_CACHE/eval`` (default ``~/.cache/miaotui/eval``)/ref-KEY.safetensors."""
    import os

    root = os.environ.get("MIAOTUI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "miaotui"
    return Path(root) / "eval" / f"ref-{key}.safetensors"
