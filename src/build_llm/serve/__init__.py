"""`build-llm serve`: an OpenAI-compatible HTTP server with continuous batching and a playground page.

    engine.py   the decoding loop: sequences join and leave a shared batch at step boundaries
    protocol.py OpenAI's wire format: settings, request parsing and checks, tokens -> choices
    app.py      the HTTP API (Starlette): /v1/models, /v1/completions, /v1/chat/completions, /health, /
    static/     the playground page (plain HTML and JavaScript, nothing fetched from elsewhere)
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import uvicorn

from build_llm.serve.app import create_app
from build_llm.serve.engine import Engine, QueueFull, Sequence, Token
from build_llm.serve.protocol import ApiError, Settings

__all__ = ["ApiError", "Engine", "QueueFull", "Sequence", "Settings", "Token", "create_app", "run_server"]


def run_server(model: Any, tokenizer: Any, settings: Settings, *, host: str = "127.0.0.1", port: int = 8000,
               max_batch: int = 8, max_queue: int = 64, shutdown_timeout: float = 30.0,
               log: Any = None) -> None:
    """Serve until SIGTERM or Ctrl-C. On SIGTERM the server stops accepting connections, lets the
    requests in flight finish (for at most `shutdown_timeout` seconds), stops the engine and returns."""
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, tokenizer, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; with this handler in place that
    # re-raise is a no-op, so a SIGTERM ends in a normal return (exit code 0).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"build-llm serve: http://{host}:{port}/ (model {settings.model_name}, {settings.dtype}, "
            f"batch up to {max_batch}, queue {max_queue}{', API key required' if settings.api_key else ''})")
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
