"""Tensor parallel: real 2-process gloo runs against the unsplit model, and torchrun's two-node rendezvous on
loopback as the stand-in for two machines."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ARCHS

pytestmark = pytest.mark.dist

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 200, 31]
BATCH = [[9, 8, 7, 6, 5], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117]]
NEW = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT]))


def _generate(model) -> dict:
    """Greedy tokens single-stream (static cache) and as a continuous batch (paged cache)."""
    from miaotui.config import SamplingParams
    from miaotui.engine.generate import generate_tokens
    from miaotui.engine.llm_engine import LLMEngine

    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    greedy = list(generate_tokens(model, PROMPT, params))
    batch = LLMEngine(model, eos_token_ids=[]).generate(BATCH, params)
    return {"greedy": greedy, "batch": batch}


def _matrix_bytes(model) -> int:
    """Bytes of the weight matrices tensor parallel splits: the 2-D state, tied weights once, without
    GPT-2's position table (replicated: every rank looks up the same positions)."""
    from miaotui.parallel import weight_bytes

    matrices = nn.Module()
    for i, (name, t) in enumerate(model.state_dict().items()):
        if t.dim() == 2 and "wpe" not in name:
            matrices.register_buffer(f"t{i}", t)
    return weight_bytes(matrices)


def _quantize(model, kind: str | None) -> None:
    """Swap the decoder's linears for packed int8 (per channel; plus the tied int8 head and embedding) or
    int4 (groups of 32: the row-parallel shards' input widths stay whole groups)."""
    if kind is None:
        return
    from miaotui.compress.quant.qtensor import quantize_rtn
    from miaotui.compress.quant.swap import layer_linears, quantize_head, swap_linears

    bits, group, sym = {"int8": (8, None, True), "int4": (4, 32, False)}[kind]
    swap_linears(model, {n: quantize_rtn(m.weight, bits, group, sym) for n, m in layer_linears(model).items()})
    if kind == "int8":
        quantize_head(model)


def _prepare(model) -> None:
    """prepare_for_inference, then the dense path for every quantized linear: the packed kernels are chosen
    by timing each shape, so a shard may pick another kernel (bf16 activations) than the whole matrix did;
    that is kernel rounding, not sharding, and would hide a real mismatch at 1e-4."""
    from miaotui.compress.quant.qlinear import QuantLinear
    from miaotui.engine.prepare import prepare_for_inference

    prepare_for_inference(model)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.packed_rows, m.use_int_mm = 0, False


def _tp_worker(rank: int, world: int, jobs: list, out_dir: str) -> None:
    """One rank: for each tiny model, shard it, compare-ready outputs from rank 0, followers replay."""
    import torch.distributed as dist

    from pathlib import Path

    from miaotui.loading import build_model
    from miaotui.loading.hf import load_hf_weights, read_hf_config
    from miaotui.parallel import apply_tp
    from miaotui.parallel.worker import TPLeader, TPWorkerLoop

    torch.set_num_threads(1)
    # a file rendezvous: a free TCP port picked in advance can be taken by another process before rank 0
    # binds it; a short collective timeout: a protocol bug fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    for name, path, fuse_first, quant, uneven in jobs:
        # the model without its tokenizer: importing transformers' tokenizer stack costs each process seconds
        p = Path(path)
        model = build_model(read_hf_config(p), load_hf_weights(p, torch.float32), torch.float32)
        _quantize(model, quant)
        if fuse_first:  # the plan must also split already-fused q|k|v and gate|up correctly
            _prepare(model)
        apply_tp(model, rank, world, uneven_heads=uneven)
        if not fuse_first:
            _prepare(model)
        logits = _logits(model)  # every rank calls the model itself: the collectives pair up
        if rank == 0:  # then rank 0 leads generation and the follower replays it
            leader = TPLeader(model)
            out = _generate(model)
            leader.stop()
            out.update(logits=logits, weight_bytes=_matrix_bytes(model))
            torch.save(out, os.path.join(out_dir, f"{name}.pt"))
        else:
            TPWorkerLoop(model).run()
    dist.destroy_process_group()


# (test name, architecture, fuse before sharding, quantization, uneven heads): every architecture sharded
# before fusing (the CLI's order); once after fusing; int8 (tied int8 head, vocab-parallel) and int4 (group
# 32); and 3 KV groups dealt 2 + 1 over the ranks (SmolLM2-135M's shape: 9 query heads, 3 KV heads)
JOBS = [(name, name, False, None, False) for name in ARCHS] + [
    ("llama-gqa-untied+fused-first", "llama-gqa-untied", True, None, False),
    ("int8-llama-mha-tied", "llama-mha-tied", False, "int8", False),
    ("int4-llama-gqa-untied", "llama-gqa-untied", False, "int4", False),
    ("uneven-6q-3kv", "llama-6q-3kv", False, None, True),
]


@pytest.fixture(scope="module")
def folders(hf_folder, tmp_path_factory):
    """Architecture → saved tiny model; ARCHS from conftest plus a 3-KV-head Llama made here."""
    import transformers

    from conftest import TINY, make_tokenizer

    paths = {name: str(hf_folder(name)[0]) for name in ARCHS}
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**dict(TINY, hidden_size=48, num_attention_heads=6, num_key_value_heads=3))
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("llama-6q-3kv")
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    paths["llama-6q-3kv"] = str(path)
    return paths


@pytest.fixture(scope="module")
def tp_results(folders, tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp")
    jobs = [(name, folders[arch], fuse, quant, uneven) for name, arch, fuse, quant, uneven in JOBS]
    mp.spawn(_tp_worker, args=(2, jobs, str(out)), nprocs=2)
    return {job[0]: torch.load(out / f"{job[0]}.pt") for job in JOBS}


@pytest.mark.parametrize("name,arch,quant", [(n, a, q) for n, a, _, q, _ in JOBS])
def test_tp2_matches_tp1(tp_results, folders, name, arch, quant):
    from miaotui.loading import load

    ref_model = load(folders[arch]).model
    _quantize(ref_model, quant)
    _prepare(ref_model)
    full_bytes = _matrix_bytes(ref_model)
    ref = {"logits": _logits(ref_model), **_generate(ref_model)}
    got = tp_results[name]
    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=0)
    assert got["greedy"] == ref["greedy"]
    assert got["batch"] == ref["batch"]
    # per-rank weight memory halves: every matrix is split, except a single KV head, which both ranks keep,
    # and uneven heads (rank 0 holds 2 of 3 KV groups)
    if name.startswith("uneven") or ARCHS[arch][2].get("num_key_value_heads", 2) < 2:
        assert full_bytes // 2 < got["weight_bytes"] < 0.6 * full_bytes
    else:
        assert got["weight_bytes"] == full_bytes // 2


def test_non_divisible_heads_refused_before_any_change(hf_folder):
    from miaotui.loading import load
    from miaotui.parallel import TPError, apply_tp

    model = load(hf_folder("llama-gqa-untied")[0]).model  # 4 query heads, 2 KV heads
    before = model.model.layers[0].self_attn.q_proj.weight.shape
    with pytest.raises(TPError, match=r"4 query heads and 2 KV heads.*a TP size that works: 1, 2, 4"):
        apply_tp(model, rank=0, world=3)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == before


def test_quantized_weight_shards_dequantize_to_the_dense_shards():
    """Row- and column-slices of codes/scale/zero equal slices of the dequantized weight (int8 and int4)."""
    from miaotui.compress.quant.qtensor import quantize_rtn
    from miaotui.parallel.qshard import shard_qweight
    from miaotui.parallel.tp import TPError

    w = torch.randn(24, 64)
    for bits, group, sym in [(8, None, True), (4, 16, False), (8, 32, False)]:
        qw = quantize_rtn(w, bits, group, sym)
        dense = qw.dequantize()
        rows = [slice(0, 4), slice(12, 16)]
        torch.testing.assert_close(shard_qweight(qw, rows=rows).dequantize(), torch.cat([dense[r] for r in rows]))
        torch.testing.assert_close(shard_qweight(qw, cols=slice(32, 64)).dequantize(), dense[:, 32:64])
    with pytest.raises(TPError, match="group size 16"):
        shard_qweight(quantize_rtn(w, 4, 16), cols=slice(0, 24))


def test_two_nodes_on_loopback_generate_like_one_process(hf_folder):
    """`--nnodes 2 --rdzv-endpoint`: two torchrun launches of one rank each, as two machines would run."""
    from miaotui.config import SamplingParams
    from miaotui.llm import LLM

    path = str(hf_folder("llama-gqa-untied")[0])
    argv = ["--temperature", "0", "-n", "8", "--ignore-eos", "--json", "Hello world"]
    expected = LLM(path).generate("Hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).text
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(2):  # a rendezvous can hang on a port taken between picking and binding it: retry once
        endpoint, rdzv_id = f"127.0.0.1:{_free_port()}", f"miaotui-test-{os.getpid()}-{attempt}"
        procs = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
             "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1",
             "-m", "miaotui", "generate", "-m", path, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node in range(2)]
        try:
            outs = [p.communicate(timeout=150) for p in procs]
            break
        except subprocess.TimeoutExpired:
            if attempt:
                raise
        finally:  # a hung rendezvous must not outlive the test
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    records = [json.loads(line) for out, _ in outs for line in out.splitlines() if line.startswith("{")]
    assert len(records) == 1  # only rank 0 prints
    assert records[0]["text"] == expected and records[0]["completion_tokens"] == 8


def test_row_parallel_keeps_linear_interface():
    """Model code reads ``in_features`` of a row-parallel layer (GPT-2's kv_shape): the wrapper exposes the
    local width, and the bias is held once outside the sharded matmul."""
    from miaotui.parallel.tp import RowParallelLinear, take

    lin = nn.Linear(8, 3)
    row = RowParallelLinear(take(lin, cols=slice(4, 8), bias=False), lin.bias.detach().clone())
    assert (row.in_features, row.out_features, row.inner.bias) == (4, 3, None)


def test_plain_process_is_rank0_of_one(monkeypatch):
    """Outside torchrun the helpers are no-ops, so library and CLI code can call them unconditionally."""
    from miaotui.parallel import dist, launch

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert dist.init() is False and not dist.initialized()
    assert (dist.rank(), dist.world_size(), dist.is_rank0()) == (0, 1, True)
    assert not launch.tp_active() and not launch.is_follower()


def test_serve_under_torchrun_answers_like_one_process(hf_folder):
    """`torchrun --nproc-per-node 2 -m miaotui serve`: rank 0 serves HTTP, rank 1 follows every step; the
    real openai client gets the single-process greedy text."""
    import time

    import httpx
    import openai

    from miaotui.config import SamplingParams
    from miaotui.llm import LLM

    path = str(hf_folder("llama-gqa-untied")[0])
    expected = LLM(path).generate("Hello world", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).text
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "miaotui", "serve", "-m", path, "--port", str(port), "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        for _ in range(2):  # twice: the follower must stay in step across requests
            out = client.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == expected
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
