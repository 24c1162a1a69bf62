"""prepare_for_inference changes speed, not results."""

from __future__ import annotations

import pytest
import torch

from miaotui.engine.prepare import UpcastLinear, prepare_for_inference, upcast_many_row_matmuls
from miaotui.loading import build_model
from miaotui.loading.hf import load_hf_weights, read_hf_config


def ours(path, dtype):
    return build_model(read_hf_config(path), load_hf_weights(path, dtype), dtype)


@pytest.mark.parametrize("name", ["llama-mha-tied", "qwen2-bias", "gpt2"])
def test_upcast_linears_match_fp32_math_and_keep_ties(name, hf_folder):
    path, _ = hf_folder(name)
    model = ours(path, torch.bfloat16)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    # reference: the same bf16 weights, every matmul in fp32, result rounded to bf16
    with torch.no_grad():
        ref = ours(path, torch.bfloat16)
        n = upcast_many_row_matmuls(model)
        assert n > 0 and all(type(m) is UpcastLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
        tied = getattr(model.args, "tie_word_embeddings", False)
        embed = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding)).weight
        assert (model.lm_head.weight is embed) == tied
        x = torch.randn(1, 24, model.lm_head.in_features, dtype=torch.bfloat16)
        lin = model.lm_head
        expected = torch.nn.functional.linear(x.float(), lin.weight.float()).to(torch.bfloat16)
        assert torch.equal(lin(x), expected)  # many rows: exactly the fp32 product
        one = x[:, :1]
        assert torch.equal(lin(one), torch.nn.functional.linear(one, lin.weight))  # one row: the bf16 kernel
        # the whole model stays close to the all-bf16 one (fp32 accumulation differs only in rounding)
        a, b = model(ids).float(), ref(ids).float()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_prepare_keeps_fp32_models_plain_and_fuses(hf_folder):
    path, ref = hf_folder("llama-gqa-untied")
    model = prepare_for_inference(ours(path, torch.float32))
    assert not any(type(m) is UpcastLinear for m in model.modules())
    assert model.model.layers[0].self_attn.qkv_proj is not None
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
