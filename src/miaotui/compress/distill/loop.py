"""The training loop every distillation shares: AdamW, warmup + cosine, gradient accumulation and clipping,
fixed sparsity masks, a progress bar with the loss, and a training state that ``resume`` continues from.

The data order is a function of the seed and the step alone (one seeded permutation per pass over the
data), and the learning rate a function of the step, so a resumed run repeats exactly what the interrupted
one would have done: the state holds only the trained weights, AdamW's moments and the step.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from miaotui.compress.distill.config import DistillConfig, DistillError
from miaotui.compress.distill.trainable import Trainable

STATE_VERSION = 1
BETAS = (0.9, 0.95)  # a shorter memory of the second moment than 0.999 suits runs of a few hundred steps

# one micro-batch's items (indices into the training set) → (loss, {name: float} parts for the bar)
LossFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in all (a resumed run counts the earlier ones)
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)  # per step, from step 1 (the saved ones included)
    seconds: float = 0.0  # this process's training time


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    span = max(cfg.steps - cfg.warmup - 1, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def item_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of the endless stream of seeded permutations of ``range(n)``."""
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = perm[offset: offset + count - len(out)]
        out += take
        pos += len(take)
    return out


def save_state(path: Path, step: int, trainable: Trainable, opt: torch.optim.Optimizer, cfg: DistillConfig,
               losses: list[float]) -> None:
    state = {"version": STATE_VERSION, "step": step, "config": cfg.fingerprint(), "losses": losses,
             "params": {n: p.detach().clone() for n, p in trainable.params.items()},
             "optimizer": opt.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves half a state behind


def load_state(path: Path, trainable: Trainable, opt: torch.optim.Optimizer,
               cfg: DistillConfig) -> tuple[int, list[float]]:
    """Restore weights and AdamW from ``path``; refuse a state saved by a different run."""
    if not path.is_file():
        raise DistillError(f"{path}: no training state to resume from (was --save-every set, or the run "
                           "interrupted?)", "resume")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise DistillError(f"{path}: not a readable training state ({e})", "resume") from None
    if state.get("version") != STATE_VERSION:
        raise DistillError(f"{path}: training state version {state.get('version')} (this miaotui reads "
                           f"{STATE_VERSION})", "resume")
    mine = cfg.fingerprint()
    diff = sorted(k for k in set(mine) | set(state["config"]) if mine.get(k) != state["config"].get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {state['config'].get(k)!r}, now {mine.get(k)!r}" for k in diff)
        raise DistillError(f"{path}: the saved run used other settings ({detail}); resume with the same ones",
                           diff[0])
    saved = state["params"]
    if set(saved) != set(trainable.params) or any(saved[n].shape != p.shape for n, p in trainable.params.items()):
        raise DistillError(f"{path}: the saved weights do not match this student's (a different model?)", "resume")
    with torch.no_grad():
        for n, p in trainable.params.items():
            p.copy_(saved[n])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["losses"])


def train(loss_fn: LossFn, n_items: int, trainable: Trainable, cfg: DistillConfig, state_path: str | Path | None = None,
          resume: bool = False, progress: bool = True, desc: str = "distill") -> TrainResult:
    """Run ``cfg.steps`` optimizer steps over ``n_items`` training items (the model must be in
    ``training_mode``); saves the state every ``cfg.save_every`` steps, at the end, and on Ctrl-C."""
    from tqdm import tqdm

    if not trainable.params:
        raise DistillError("the student has no trainable float weights (every linear quantized?)", "student")
    state_path = Path(state_path) if state_path is not None else None
    params = list(trainable.params.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=BETAS, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    if resume:
        if state_path is None:
            raise DistillError("resume needs a state path", "resume")
        start, losses = load_state(state_path, trainable, opt, cfg)
    result = TrainResult(steps=start, resumed_from=start, losses=losses)
    per_step = cfg.batch_size * cfg.grad_accum
    t0 = time.perf_counter()
    updating = False
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            items = item_order(n_items, cfg.seed, step * per_step, per_step)
            total, parts_sum = 0.0, {}
            for a in range(cfg.grad_accum):
                loss, parts = loss_fn(items[a * cfg.batch_size:(a + 1) * cfg.batch_size])
                if not torch.isfinite(loss):
                    raise DistillError(f"the loss became {loss.item()} at step {step + 1}: lower the learning "
                                       "rate", "lr")
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            updating = True  # an interrupt from here to the end of the update leaves no consistent state
            trainable.mask_grads()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
            trainable.apply_masks()
            updating = False
            losses.append(total)
            result.steps = step + 1
            bar.set_postfix(loss=f"{total:.4f}", **{k: f"{v:.4f}" for k, v in parts_sum.items()},
                            lr=f"{lr_at(step, cfg):.2e}", refresh=False)  # drawn once, by update()
            bar.update(1)
            if state_path is not None and cfg.save_every and result.steps % cfg.save_every == 0:
                save_state(state_path, result.steps, trainable, opt, cfg, losses)
    except KeyboardInterrupt:
        if state_path is not None and not updating and result.steps > start:
            save_state(state_path, result.steps, trainable, opt, cfg, losses)
            bar.write(f"interrupted: state at step {result.steps} saved to {state_path} (continue with resume)")
        raise
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
    if state_path is not None and result.steps > start:
        save_state(state_path, result.steps, trainable, opt, cfg, losses)
    result.seconds = time.perf_counter() - t0
    return result
