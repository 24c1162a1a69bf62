"""`/v1/embeddings` end to end: a real uvicorn server on 127.0.0.1 driven by the real `openai` client and httpx,
on a tiny random BERT saved here (and on the real all-MiniLM-L6-v2, slow); embeddings compared with
`Encoder.encode` and the `miaotui embed` CLI."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from test_bert import TEXTS, folder, sentence_transformers_folder  # noqa: F401
from test_server import Running

from miaotui.cli.main import main
from miaotui.encoder import Encoder
from miaotui.server.app import ServerConfig

LONG = " ".join(["the cat sat on the mat ."] * 12)  # more than the tiny model's 40 tokens


@pytest.fixture(scope="module")
def st_path(folder, tmp_path_factory):
    """The tiny BERT in sentence-transformers layout (mean pooling, normalised)."""
    return sentence_transformers_folder(folder, tmp_path_factory.mktemp("st"), {"pooling_mode_mean_tokens": True},
                                        normalize=True)[0]


@pytest.fixture(scope="module")
def encoder(st_path):
    return Encoder(st_path)


@pytest.fixture(scope="module")
def srv(st_path):
    s = Running(ServerConfig(model=str(st_path), served_model_name="tiny-enc", max_queue=4))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def post(srv, body, route="/v1/embeddings") -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{srv.url}{route}", content=content, timeout=30)


def vectors(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_embeddings_equal_encode(client, encoder, fmt):
    # the openai client asks for base64 when no format is given and decodes it itself
    kw = {"encoding_format": "float"} if fmt == "float" else {}
    resp = client.embeddings.create(model="tiny-enc", input=TEXTS, **kw)
    np.testing.assert_array_equal(vectors(resp), encoder.encode(TEXTS))  # float32 survives JSON exactly
    tokens = sum(len(x) for x in encoder.tokenize(TEXTS)[0])
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == tokens
    assert resp.model == "tiny-enc" and resp.data[0].object == "embedding"


def test_single_text_and_token_ids(client, encoder):
    one = client.embeddings.create(model="tiny-enc", input=TEXTS[2])
    assert len(one.data) == 1
    np.testing.assert_array_equal(vectors(one)[0], encoder.encode(TEXTS[2]))
    ids = [encoder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]]
    by_ids = client.embeddings.create(model="tiny-enc", input=ids, encoding_format="float")
    np.testing.assert_allclose(vectors(by_ids), encoder.encode(TEXTS[:3]), atol=1e-6)
    single_ids = client.embeddings.create(model="tiny-enc", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(vectors(single_ids)[0], encoder.encode(TEXTS[0]), atol=1e-6)


def test_cli_embed_equals_server(client, st_path, tmp_path):
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", str(st_path), "--output", str(out), *TEXTS]) == 0
    resp = client.embeddings.create(model="tiny-enc", input=TEXTS)
    np.testing.assert_array_equal(vectors(resp), np.load(out))


def test_concurrent_requests_are_batched_together(srv, client, encoder):
    loop = srv.state.embed_loop
    real, calls, gate = loop.encoder.embed, [], threading.Event()

    def slow_embed(ids, *a, **kw):  # the first forward waits until the other requests have queued
        calls.append(len(ids))
        if len(calls) == 1:
            gate.wait(10)
        return real(ids, *a, **kw)

    loop.encoder.embed = slow_embed
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client.embeddings.create, model="tiny-enc", input=[t]) for t in TEXTS]
            for _ in range(1000):  # until every input is in the blocked forward or waiting behind it
                if sum(calls) + sum(len(j.ids) for j in loop._inbox) == len(TEXTS):
                    break
                threading.Event().wait(0.01)
            gate.set()
            results = [vectors(f.result())[0] for f in futures]
    finally:
        loop.encoder.embed = real
    np.testing.assert_allclose(np.stack(results), encoder.encode(TEXTS), atol=1e-6)
    assert len(calls) == 2 and sum(calls) == len(TEXTS)  # whatever waited went as one batch


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": "   "}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a cat", ""]}, "input[1]"),
    ({"input": 5}, "input"),
    ({"input": ["a cat", 5]}, "input"),
    ({"input": [[1, 2], []]}, "input[1]"),
    ({"input": [10**6]}, "input"),
    ({}, "input"),
    ({"input": "a cat", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "a cat", "dimensions": 8}, "dimensions"),
    ({"input": "a cat", "model": "other"}, "model"),
])
def test_bad_inputs_get_400_naming_the_parameter(srv, body, param):
    r = post(srv, body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert err["param"].startswith(param) and err["message"]


def test_dimensions_equal_to_the_model_is_accepted(srv, encoder):
    r = post(srv, {"input": "a cat", "dimensions": encoder.dim})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == encoder.dim


def test_overlong_input_is_truncated_or_refused(srv, st_path, encoder):
    r = post(srv, {"input": ["a cat", LONG], "encoding_format": "float"})
    assert r.status_code == 200
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    with pytest.warns(UserWarning, match="truncated"):
        want = encoder.encode(["a cat", LONG])
    np.testing.assert_array_equal(got, want)
    assert r.json()["usage"]["prompt_tokens"] == 4 + encoder.max_tokens
    strict = Running(ServerConfig(model=str(st_path), served_model_name="tiny-enc", truncate=False))
    try:
        r = post(strict, {"input": ["a cat", LONG]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert post(strict, {"input": "a cat"}).status_code == 200
    finally:
        strict.stop()


def test_text_routes_say_the_model_is_an_encoder(srv, client):
    for route, body in [("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
        r = post(srv, body, route)
        assert r.status_code == 400 and "encoder" in r.json()["error"]["message"], r.text
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-enc"] and models[0].model_extra["max_model_len"] == 40


def test_a_decoder_refuses_embeddings(hf_folder):
    path, _ = hf_folder("llama-gqa-untied")
    s = Running(ServerConfig(model=str(path), served_model_name="tiny-llm", max_model_len=128))
    try:
        r = post(s, {"input": "hello"})
        assert r.status_code == 400 and "decoder" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "model"
    finally:
        s.stop()


@pytest.mark.slow
def test_minilm_server_equals_cli(tmp_path):
    from miaotui.eval.embeddings import eval_texts
    from miaotui.loading.encoder import default_encoder_path

    texts = eval_texts(None, limit=8)[0]
    s = Running(ServerConfig(model=str(default_encoder_path()), served_model_name="minilm"))
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        got = vectors(c.embeddings.create(model="minilm", input=texts))
    finally:
        s.stop()
    out = tmp_path / "e.npy"
    assert main(["embed", "--output", str(out), *texts]) == 0
    np.testing.assert_allclose(got, np.load(out), atol=1e-6)
    assert got.shape == (8, 384)
