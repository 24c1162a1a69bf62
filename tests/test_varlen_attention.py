"""The native varlen attention kernel (encoders): equal to an fp64 softmax(q kᵀ) v per sequence and head, and
the encoder forward through it equal to the SDPA path it replaces."""

from __future__ import annotations

import pytest
import torch

from miaotui import kernels
from miaotui.models.bert import BertEncoder

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")


def reference(qkv: torch.Tensor, lengths: list[int], heads: int, scale: float) -> torch.Tensor:
    out, start = [], 0
    for n in lengths:
        q, k, v = qkv[start:start + n].double().view(n, 3, heads, -1).permute(1, 2, 0, 3)  # 3 × (H, n, D)
        out.append((torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v).transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 40, 64, 72])  # value passes of 32 and tails of 8-24
@pytest.mark.parametrize("lengths", [[1], [7], [17, 1, 33, 4], [64, 63, 2, 16, 15]])  # tails of 4 queries, 16 keys
def test_equals_fp64_attention(head_dim, lengths):
    g = torch.Generator().manual_seed(head_dim * 100 + len(lengths))
    heads = 3
    qkv = torch.randn(sum(lengths), 3 * heads * head_dim, generator=g) * 3  # large scores: a peaked softmax
    cu = torch.tensor([0] + lengths).cumsum(0)
    got = kernels.varlen_attention(qkv, cu, heads, head_dim ** -0.5)
    # fp32 scores of ~10 carry ~1e-6 of error each, which exp turns into relative errors of the weights
    torch.testing.assert_close(got.double(), reference(qkv, lengths, heads, head_dim ** -0.5), atol=5e-5, rtol=1e-4)


def test_strided_rows_and_bf16_input():
    """qkv may be a column slice of a wider buffer (rows contiguous, a row stride of its own); bf16 in, bf16 out."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(30, 3 * 2 * 16 + 5, generator=g)
    qkv, cu = wide[:, :96], torch.tensor([0, 11, 30])
    torch.testing.assert_close(kernels.varlen_attention(qkv, cu, 2, 0.25).double(),
                               reference(qkv, [11, 19], 2, 0.25), atol=2e-6, rtol=1e-5)
    y = kernels.varlen_attention(qkv.bfloat16(), cu, 2, 0.25)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(qkv.bfloat16().float(), [11, 19], 2, 0.25), atol=2e-2, rtol=2e-2)


def test_bad_inputs_are_refused():
    qkv = torch.zeros(10, 48)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.miaotui.varlen_attention(qkv, torch.tensor([0, 10]), 4, 1.0)  # head_dim 4
    with pytest.raises(RuntimeError, match="from 0 to the number of rows"):
        torch.ops.miaotui.varlen_attention(qkv, torch.tensor([0, 9]), 2, 1.0)
    with pytest.raises(RuntimeError, match="every sequence needs a token"):
        torch.ops.miaotui.varlen_attention(qkv, torch.tensor([0, 4, 4, 10]), 2, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.miaotui.varlen_attention(qkv, torch.tensor([0, 10], dtype=torch.int32), 2, 1.0)


def test_opcheck():
    """Schema and fake (meta) implementation agree: a compiled encoder calls the op without a graph break."""
    args = (torch.randn(9, 48), torch.tensor([0, 4, 9]), 2, 0.5)
    torch.testing.assert_close(torch.ops.miaotui.varlen_attention(*args), torch.ops.miaotui.varlen_attention(*args))
    torch.library.opcheck(torch.ops.miaotui.varlen_attention, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("heads,hidden", [(2, 32), (4, 64)])
def test_encoder_native_attention_equals_sdpa_path(heads, hidden):
    """The same packed batch through the native kernel and through SDPA on padded rectangles (what training
    and CUDA use), with fused and unfused q/k/v."""
    torch.manual_seed(0)
    cfg = dict(model_type="bert", vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=64)
    model = BertEncoder.from_config(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    lengths = [23, 5, 1, 17]
    batch = model.pack([torch.randint(0, 50, (n,)).tolist() for n in lengths])
    with torch.no_grad():
        for fuse in (False, True):
            if fuse:
                model.fuse()
            outs = []
            for native in (False, True):
                for layer in model.layers:
                    layer.attention.native = native
                outs.append(model(batch))
            torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
