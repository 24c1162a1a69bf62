"""Serve a model behind an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streaming with
SSE), /v1/models, /health and /metrics (Prometheus). All requests share one continuous-batching engine.
An encoder (BERT family, e.g. all-MiniLM-L6-v2) serves /v1/embeddings instead, its requests batched together.

examples:
  miaotui serve                                          # the embedded default model on 127.0.0.1:8000
  miaotui serve -m path/to/model --port 8080 --api-key secret --max-num-seqs 32
  miaotui serve -m path/to/all-MiniLM-L6-v2      # then: curl localhost:8000/v1/embeddings -d '{"input": "hi"}'
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 32}'

Overload answers 429 with Retry-After; SIGTERM (or Ctrl-C) stops taking requests, lets running ones finish
for up to --drain-timeout seconds, then exits.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="PATH",
                   help="a Hugging Face model folder or a .gguf file, or an encoder folder / compressed encoder "
                        "checkpoint for /v1/embeddings (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default: fp32)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it: set --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("MIAOTUI_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $MIAOTUI_API_KEY; none: no check)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the model's folder/file name)")
    p.add_argument("--max-num-seqs", type=int, default=16, metavar="N",
                   help="sequences decoded together in one batch (default: 16)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="sequences allowed to wait for a batch slot; beyond that requests get 429 (default: 64)")
    p.add_argument("--max-model-len", type=int, default=2048, metavar="N",
                   help="context length: prompt + answer, capped at the model's (default: 2048)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, metavar="GIB",
                   help="most memory for the paged KV cache; fewer, longer sequences preempt (default: 1.0)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="abort a request not finished after S seconds, queueing included: 504 (default: 600)")
    p.add_argument("--max-body-kib", type=int, default=1024, metavar="KIB",
                   help="largest request body accepted, else 413 (default: 1024)")
    p.add_argument("--no-truncate", action="store_true",
                   help="encoders: answer 400 to /v1/embeddings inputs longer than the model's limit instead of "
                        "truncating them to it (default: truncate)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, wait up to S seconds for running requests before exiting (default: 30)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log verbosity (default: info)")


def run(args: argparse.Namespace) -> int:
    import ipaddress
    import logging

    import uvicorn

    from miaotui.parallel import launch
    from miaotui.server.app import ServerConfig, create_app

    if launch.is_follower():  # under torchrun: ranks > 0 replay rank 0's forwards; rank 0 serves HTTP
        return launch.follow(args.model, args.dtype, args.threads)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.api_key and not _is_loopback(args.host, ipaddress):
        print(f"miaotui serve: warning: listening on {args.host} without --api-key: anyone who can reach it "
              "can use it", file=sys.stderr)
    cfg = ServerConfig(model=args.model, dtype=args.dtype, served_model_name=args.served_model_name,
                       api_key=args.api_key or None, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
                       max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                       request_timeout=args.request_timeout, max_body_bytes=args.max_body_kib * 1024,
                       truncate=not args.no_truncate)
    failed: list[str] = []

    def load_failed(message: str) -> None:  # no model, no server: exit rather than answer 503 forever
        failed.append(message)
        server.should_exit = True

    loaded = launch.lead_loaded(args.model, args.dtype) if launch.tp_active() else None
    app = create_app(cfg, loaded=loaded, on_load_failed=load_failed)
    server = _DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                            timeout_graceful_shutdown=args.drain_timeout, access_log=False))
    server.run()
    if failed:
        from miaotui.errors import MiaotuiError

        raise MiaotuiError(failed[0])
    return 0


def _is_loopback(host: str, ipaddress) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_class():
    import contextlib

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: /health turns 503 and new requests are refused while uvicorn lets the running
        ones finish (up to ``timeout_graceful_shutdown``)."""

        def handle_exit(self, sig, frame) -> None:
            self.config.app.state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:  # drained: exit 0 rather than by uvicorn re-raising the signal it caught
                    getattr(self, "_captured_signals", []).clear()

    return DrainingServer


def _DrainingServer(config):  # noqa: N802 (a class made lazily, so --help never imports uvicorn)
    return _server_class()(config)
