"""The native paged decode attention (batched decode over the paged KV cache) against the gather + matmul path
it replaces, on random pools and block tables: GQA, sliding windows, contexts of every tail length."""

from __future__ import annotations

import pytest
import torch

from miaotui import kernels
from miaotui.engine.paged_cache import DecodeGroup, PagedKVCache
from miaotui.models.base import decode_attention

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels do not build on this machine")


def setup(seed: int, lengths: list[int], heads: int, kv_heads: int, dim: int, block_size: int = 4):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lengths)
    num_blocks = width * len(lengths) + 3
    cache = PagedKVCache(num_blocks, block_size, kv_heads, dim, torch.float32)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g) * 2)
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    blocks = torch.randperm(num_blocks, generator=g).tolist()  # shuffled, as a long-running pool leaves them
    tables = [[blocks.pop() for _ in range(-(-n // block_size))] for n in lengths]
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    group = DecodeGroup(tables, torch.tensor(lengths), block_size)
    q = torch.randn(len(lengths), heads, dim, generator=g) * 2
    return cache, group, q


def reference(cache: PagedKVCache, group: DecodeGroup, q: torch.Tensor, scale: float, window: int | None):
    k, v = cache._gather_decode(cache.k, group, "k"), cache._gather_decode(cache.v, group, "v")
    return decode_attention(q.unsqueeze(2), k.clone(), v, scale, group.keep(window))[:, :, 0]


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 8), (9, 3, 64), (6, 2, 40), (2, 1, 136)])
@pytest.mark.parametrize("window", [None, 5])
def test_equals_gathered_attention(heads, kv_heads, dim, window):
    lengths = [1, 7, 8, 9, 16, 23, 40]  # below, at and past a group of 8 keys; block tails
    cache, group, q = setup(heads * dim, lengths, heads, kv_heads, dim)
    scale = dim ** -0.5
    got = kernels.paged_decode_attention(q, cache.k, cache.v, group.block_tables, group.context_lens, 4, scale,
                                         window)
    torch.testing.assert_close(got, reference(cache, group, q, scale, window), atol=2e-5, rtol=1e-4)


def test_paged_cache_uses_it_and_matches_its_own_fallback():
    """PagedKVCache picks the native kernel for an fp32 cache, and its output equals the gather path's."""
    from miaotui.engine.paged_cache import StepBatch

    cache, group, q = setup(3, [5, 12], 6, 2, 16)
    step = StepBatch(torch.zeros(1, 2, dtype=torch.long), torch.tensor([4, 11]), torch.tensor([0, 1]),
                     torch.tensor([0, 1]), ["a", "b"], group, [])
    cache.step = step
    # each call first writes the step's K/V (zeros) at slots 0 and 1: the same cache state for both paths
    qf = q.transpose(0, 1).unsqueeze(0)  # (1, H, B, D)
    kv = torch.zeros(1, 2, 2, 16)
    outs = []
    for native in (True, False):
        cache.native = native
        outs.append(cache.attend(qf, kv, kv, torch.tensor([4, 11])))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
    cache.native = None
    assert cache._native_decode(qf)


def test_bad_inputs_are_refused():
    cache, group, q = setup(0, [5], 2, 2, 8)
    with pytest.raises(RuntimeError, match="outside its block table"):
        kernels.paged_decode_attention(q, cache.k, cache.v, group.block_tables, torch.tensor([9]), 4, 1.0)
    with pytest.raises(RuntimeError, match="block id out of the pool"):
        kernels.paged_decode_attention(q, cache.k, cache.v, torch.tensor([[10 ** 6, 0]]), group.context_lens, 4, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernels.paged_decode_attention(q[..., :4], cache.k[..., :4].contiguous(), cache.v[..., :4].contiguous(),
                                       group.block_tables, group.context_lens, 4, 1.0)


def test_opcheck():
    cache, group, q = setup(1, [3, 9], 4, 2, 8)
    args = (q, cache.k, cache.v, group.block_tables, group.context_lens, 4, 0.5, 0)
    torch.library.opcheck(torch.ops.miaotui.paged_decode_attention, args, test_utils=("test_schema", "test_faketensor"))
