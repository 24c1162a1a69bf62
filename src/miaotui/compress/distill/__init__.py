"""Knowledge distillation: train a compressed or smaller student to imitate its original.

- ``distill(student, teacher, windows, ...)``: decoders, KL on temperature-scaled logits (+ hidden states);
- ``distill_encoder(student, teacher, texts, ...)``: encoders, 1 − cosine / MSE of pooled embeddings;
- ``run_distill(ctx, params)``: the ``distill`` recipe step (``compress/recipe.py``);
- ``layer_subset(teacher, keep)``: a smaller student initialised from the teacher's own layers.

Both share ``loop.train`` (AdamW, warmup + cosine, accumulation, clipping, fixed sparsity masks, resumable
training state). ``miaotui distill`` is the command line.
"""

from miaotui.compress.distill.config import DistillConfig, DistillError
from miaotui.compress.distill.decoder import DistillReport, distill
from miaotui.compress.distill.encoder import distill_encoder, encoder_subset
from miaotui.compress.distill.step import run_distill
from miaotui.compress.distill.student import default_layer_map, evenly_spaced, layer_map, layer_subset

__all__ = ["DistillConfig", "DistillError", "DistillReport", "default_layer_map", "distill", "distill_encoder",
           "encoder_subset", "evenly_spaced", "layer_map", "layer_subset", "run_distill"]
