"""The FastAPI app: OpenAI routes, SSE streaming, API-key check, body limit, /health and /metrics.

A decoder serves /v1/completions and /v1/chat/completions through ``EngineLoop``; an encoder (BERT family)
serves /v1/embeddings through ``EmbeddingLoop``; each answers the other's routes with a 400 saying why.

    app = create_app(ServerConfig(model="path/to/model"))     # uvicorn.run(app, host=..., port=...)

The model loads in a background thread once the server is up, so ``/health`` can answer 503 ("loading")
meanwhile. Every client-caused problem is an ``ApiError`` (4xx, OpenAI error object naming the parameter).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from miaotui.server import convert
from miaotui.server.engine_loop import EngineLoop, Event, LoopDead, QueueFull
from miaotui.server.metrics import Metrics
from miaotui.server.embedding_loop import EmbeddingFailed, EmbeddingLoop
from miaotui.server.embeddings import embedding_inputs, embedding_response
from miaotui.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse
from miaotui.server.responses import Reply

log = logging.getLogger("miaotui.server")
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}
POLL_S = 0.25  # how often a request waiting for tokens checks whether its client is still there


@dataclass
class ServerConfig:
    model: str | None = None
    dtype: str = "fp32"
    served_model_name: str | None = None
    api_key: str | None = None
    max_num_seqs: int = 16
    max_queue: int = 64
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    truncate: bool = True  # encoders: cut over-long /v1/embeddings inputs to the model's limit (else 400)
    embed_batch_size: int = 32  # encoders: inputs per packed forward


class ClientGone(Exception):
    pass


class ServerState:
    def __init__(self, cfg: ServerConfig, loaded=None, on_load_failed: Callable[[str], None] | None = None):
        self.cfg, self._loaded, self.on_load_failed = cfg, loaded, on_load_failed
        self.metrics = Metrics()
        self.loop: EngineLoop | None = None
        self.encoder = None  # an Encoder when the model is BERT-family: /v1/embeddings only
        self.embed_loop: EmbeddingLoop | None = None
        self.max_model_len = 0
        self.tokenizer = None
        self.limits: convert.Limits | None = None
        self.model_name = cfg.served_model_name or "miaotui"
        self.load_error: str | None = None
        self.draining = False

    def load(self) -> None:
        from miaotui.engine.engine_config import CacheConfig, EngineConfig
        from miaotui.engine.prepare import prepare_for_inference
        from miaotui.loading import load
        from miaotui.server.logits import ServerEngine

        cfg = self.cfg
        try:
            lm = self._loaded or load(cfg.model, cfg.dtype)
            if _is_encoder(lm):
                return self._start_encoder(lm)
            prepare_for_inference(lm.model)
            ec = EngineConfig(max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
                              max_num_batched_tokens=max(512, cfg.max_num_seqs),
                              cache=CacheConfig(memory_budget_gib=cfg.kv_cache_gib))
            loop = EngineLoop(lambda: ServerEngine(lm, config=ec), lm.tokenizer, self.metrics, cfg.max_queue)
            e = loop.engine
            self.limits = convert.Limits(e.config.max_model_len, e.vocab_size, e.config.cache.num_slots,
                                         e.config.cache.block_size, loop.capacity)
            if not cfg.served_model_name:  # the folder's name, or the file's without its extension
                self.model_name = lm.path.name if lm.path.is_dir() else lm.path.stem
            self.tokenizer = lm.tokenizer
            self.max_model_len = e.config.max_model_len
            self.loop = loop.start()
            self._loaded = None  # the engine holds the model now
            log.info("ready: %s, context %d, %d KV slots, up to %d sequences (%d running)", self.model_name,
                     e.config.max_model_len, e.config.cache.num_slots, loop.capacity, e.config.max_num_seqs)
        except Exception as e:  # noqa: BLE001 (reported by /health and the CLI)
            log.exception("loading the model failed")
            self.load_error = f"{type(e).__name__}: {e}"
            if self.on_load_failed:
                self.on_load_failed(self.load_error)

    def _start_encoder(self, loaded) -> None:
        from miaotui.encoder import Encoder
        from miaotui.server.embedding_loop import EmbeddingLoop

        encoder = loaded if hasattr(loaded, "embed") else Encoder(loaded)
        self.model_name = self.cfg.served_model_name or encoder.loaded.path.name
        self.encoder, self.tokenizer, self.max_model_len = encoder, encoder.tokenizer, encoder.max_tokens
        self.embed_loop = EmbeddingLoop(encoder, self.metrics, self.cfg.embed_batch_size,
                                        max_queue_inputs=max(1, self.cfg.max_queue) * 64).start()
        self._loaded = None
        log.info("ready: %s (an encoder: /v1/embeddings), %d dimensions, inputs up to %d tokens (%s)",
                 self.model_name, encoder.dim, encoder.max_tokens, "truncated" if self.cfg.truncate else "refused")

    @property
    def running_loop(self):
        return self.loop if self.loop is not None else self.embed_loop

    def health(self) -> tuple[int, str]:
        if self.load_error:
            return 503, f"failed: {self.load_error}"
        if self.running_loop is None:
            return 503, "loading"
        if not self.running_loop.alive:
            return 503, "dead"
        if self.draining:
            return 503, "draining"
        return 200, "ok"

    def require_ready(self) -> EngineLoop:
        status, what = self.health()
        if status != 200:
            raise ApiError(503, f"the server is not ready ({what})", code="unavailable",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})
        return self.running_loop


class Edge:
    """Pure ASGI (so streaming and disconnects pass through untouched): API key, and requests by status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.state.cfg.api_key
            if key and scope["path"] != "/health" and not _authorized(scope, key):
                err = ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               code="invalid_api_key")
                await _error_response(err)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.state.metrics.requests.labels(route, str(status[0])).inc()


def _authorized(scope, key: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(cfg: ServerConfig, loaded=None, on_load_failed=None) -> FastAPI:
    """``loaded``: an already loaded model (tests); else ``cfg.model`` loads in the background."""
    state = ServerState(cfg, loaded, on_load_failed)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="miaotui-load", daemon=True).start()
        yield
        if state.running_loop is not None:
            state.running_loop.stop()

    app = FastAPI(title="miaotui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.miaotui = state

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error_response(ApiError(e.status_code, str(e.detail)))

    @app.get("/health")
    async def health():
        status, what = state.health()
        return JSONResponse({"status": what}, status_code=status)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        state.require_ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "miaotui", "max_model_len": state.max_model_len}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = parse(EmbeddingRequest, await _read_body(request, cfg.max_body_bytes))
        loop = _check_model(state, req, "/v1/embeddings")
        if state.encoder is None:
            raise ApiError(400, f"model {state.model_name!r} generates text (a decoder): /v1/embeddings needs an "
                                "encoder (BERT family, e.g. all-MiniLM-L6-v2: miaotui serve --model ENCODER)",
                           "model", "model_not_supported")
        ids, types = embedding_inputs(req, state.encoder, cfg.truncate)
        try:
            future = loop.submit(ids, types)
        except QueueFull:
            raise ApiError(429, f"the server is full ({loop.capacity} inputs waiting); retry later",
                           code="queue_full", headers={"Retry-After": str(state.cfg.retry_after_s)}) from None
        except LoopDead:
            raise ApiError(503, "the engine is not running", code="unavailable") from None
        try:
            emb = await asyncio.wait_for(future, timeout=state.cfg.request_timeout)
        except TimeoutError:
            raise ApiError(504, f"no answer within the request timeout ({state.cfg.request_timeout:g} s)",
                           code="timeout") from None
        except (EmbeddingFailed, LoopDead) as e:
            raise ApiError(500, f"embedding failed: {e}", code="engine_error") from None
        return embedding_response(emb, req.encoding_format, state.model_name, sum(map(len, ids)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _read_body(request, cfg.max_body_bytes))
        loop = _start(state, req, "/v1/completions")
        convert.check_unsupported(req)
        prompts, texts = convert.completion_prompts(req, state.tokenizer, state.limits)
        limits = state.limits
        max_tokens = [convert.max_new_tokens(len(p), req.max_tokens, convert.COMPLETIONS_DEFAULT_MAX_TOKENS,
                                             limits, "prompt", "max_tokens") for p in prompts]
        specs = convert.build_specs(_new_id(), prompts, req, max_tokens,
                                    convert.extras(req, req.logprobs, limits), limits)
        echo = [texts[i // req.n] for i in range(len(specs))] if req.echo else None
        reply = Reply(False, f"cmpl-{uuid.uuid4().hex}", state.model_name, state.tokenizer, len(specs),
                      sum(map(len, prompts)), req.logprobs is not None, echo)
        return await _answer(state, loop, request, req, specs, reply)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await _read_body(request, cfg.max_body_bytes))
        loop = _start(state, req, "/v1/chat/completions")
        ids = convert.chat_prompt(req, state.tokenizer)
        asked, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens
                        is not None else (req.max_tokens, "max_tokens"))
        mt = convert.max_new_tokens(len(ids), asked, None, state.limits, "messages", param)
        ext = convert.extras(req, convert.chat_logprobs(req), state.limits)
        specs = convert.build_specs(_new_id(), [ids], req, [mt], ext, state.limits)
        reply = Reply(True, f"chatcmpl-{uuid.uuid4().hex}", state.model_name, state.tokenizer, len(specs),
                      len(ids), ext.logprobs is not None)
        return await _answer(state, loop, request, req, specs, reply)

    return Edge(app, state)


def _is_encoder(loaded) -> bool:
    from miaotui.loading.encoder import LoadedEncoder

    return isinstance(loaded, LoadedEncoder) or hasattr(loaded, "embed")  # a LoadedEncoder or an Encoder


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def _start(state: ServerState, req, route: str) -> EngineLoop:
    loop = _check_model(state, req, route)
    if state.encoder is not None:
        raise ApiError(400, f"model {state.model_name!r} is an encoder (an embedding model): it serves "
                            f"/v1/embeddings, not {route}", "model", "model_not_supported")
    return loop


def _check_model(state: ServerState, req, route: str):
    loop = state.require_ready()
    if req.model_extra:
        log.warning("%s: ignoring unknown field(s) %s", route, ", ".join(sorted(req.model_extra)))
    if req.model is not None and req.model != state.model_name:
        raise ApiError(404, f"model {req.model!r} does not exist; this server serves {state.model_name!r}",
                       "model", "model_not_found")
    return loop


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(state: ServerState, loop: EngineLoop, request: Request, req, specs, reply: Reply):
    try:
        queue = loop.submit(specs)
    except QueueFull:
        raise ApiError(429, f"the server is full ({loop.capacity} sequences running or waiting); retry later",
                       code="queue_full", headers={"Retry-After": str(state.cfg.retry_after_s)}) from None
    except LoopDead:
        raise ApiError(503, "the engine is not running", code="unavailable") from None
    events = _events(state, loop, request, queue, specs)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(reply, events, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        async for ev in events:
            reply.add(ev)
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, metrics do
    return reply.whole()


async def _events(state: ServerState, loop: EngineLoop, request: Request, queue: asyncio.Queue,
                  specs) -> AsyncIterator[Event]:
    """Events until every sequence finished; aborts the unfinished ones however this ends (disconnect,
    timeout, error, a cancelled stream)."""
    pending = {s.index: s.seq_id for s in specs}
    deadline = time.monotonic() + state.cfg.request_timeout
    try:
        while pending:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise ApiError(504, f"no answer within the request timeout ({state.cfg.request_timeout:g} s)",
                                   code="timeout") from None
                if await request.is_disconnected():
                    raise ClientGone() from None
                continue
            if ev.error:
                pending.pop(ev.index, None)
                raise ApiError(ev.error[0], ev.error[1], code="engine_error" if ev.error[0] >= 500 else None)
            if ev.finish_reason:
                pending.pop(ev.index, None)
            yield ev
    finally:
        if pending:
            loop.abort(list(pending.values()))


async def _sse(reply: Reply, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[str]:
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        for chunk in reply.first_chunks():
            yield data(chunk)
        try:
            async for ev in events:
                for chunk in reply.chunks(ev):
                    yield data(chunk)
        except ClientGone:
            return
        except ApiError as e:  # the 200 header is out: the error goes in the stream, as OpenAI does
            yield data(e.body())
        if include_usage:
            yield data(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:  # a client gone mid-send closes us, not `events`: close it so its sequences are aborted now
        await events.aclose()
