"""``miaotui serve``: an OpenAI-compatible HTTP server over one continuous-batching engine.

protocol.py (pydantic request schema, OpenAI error objects) → convert.py (one place where a request becomes
prompt ids + ``SamplingParams``) → engine_loop.py (the one engine thread; per-request asyncio queues) →
app.py (routes, SSE, auth, /health, /metrics); logits.py adds the OpenAI-only sampling knobs to the engine.
"""
