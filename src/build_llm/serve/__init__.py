"""`build-llm serve`: an OpenAI-compatible HTTP server with continuous batching and a playground page.

    engine.py   the decoding loop: sequences join and leave a shared batch at step boundaries
    protocol.py OpenAI's wire format: settings, request parsing and checks, tokens -> choices
    app.py      the HTTP API (Starlette): /v1/models, /v1/completions, /v1/chat/completions, /health, /
    static/     the playground page (plain HTML and JavaScript, nothing fetched from elsewhere)
"""

from __future__ import annotations

import dataclasses
import errno
import signal
import socket
import sys
from typing import Any, Iterable

from build_llm.errors import UsageError
from build_llm.serve.app import allowed_hosts, create_app
from build_llm.serve.engine import Engine, QueueFull, Sequence, Token
from build_llm.serve.protocol import ApiError, Settings

__all__ = ["ApiError", "Engine", "QueueFull", "Sequence", "Settings", "Token", "allowed_hosts", "create_app",
           "run_server"]


def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of `host` (as asyncio, and so uvicorn, would open them),
    bound here so that a port in use or an address not of this machine is one clear UsageError, not
    uvicorn's log line and exit code 3."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host!r} cannot be resolved ({e.strerror}); give an address such as 127.0.0.1")
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "localhost" may give both ::1 and 127.0.0.1: one socket each
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as e:
        for sock in sockets:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} is in use on {host} (another server is listening there); "
                             "choose another with --port") from None
        if e.errno == errno.EACCES:
            raise UsageError(f"binding port {port} on {host} was refused (permission denied); ports below 1024 "
                             "need privileges: choose --port 1024 or above") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; --host must be an address of this "
                         "machine") from None
    return sockets


def run_server(model: Any, tokenizer: Any, settings: Settings, *, host: str = "127.0.0.1", port: int = 8000,
               max_batch: int = 8, max_queue: int = 64, shutdown_timeout: float = 30.0,
               allow_hosts: Iterable[str] = (), log: Any = None) -> None:
    """Serve until SIGTERM or Ctrl-C. On SIGTERM the server stops accepting connections, lets the
    requests in flight finish (for at most `shutdown_timeout` seconds), stops the engine and returns.
    Bound to a loopback `host`, it answers only requests sent to this machine's names and to
    `allow_hosts`; bound elsewhere, any Host unless `allow_hosts` names some (see `allowed_hosts`)."""
    import uvicorn  # deferred: it (and click, which it imports) would slow every other verb's start

    settings = dataclasses.replace(settings, allowed_hosts=allowed_hosts(host, allow_hosts))
    sockets = bind(host, port)
    # uvicorn re-raises the signal it caught once it has shut down; with this handler in place that
    # re-raise is a no-op, so a SIGTERM ends in a normal return (exit code 0).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
        app = create_app(engine, tokenizer, settings)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=shutdown_timeout, lifespan="on", access_log=False)
        server = uvicorn.Server(config)
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"build-llm serve: http://{host}:{port}/ (model {settings.model_name}, {settings.dtype}, "
            f"batch up to {max_batch}, queue {max_queue}{', API key required' if settings.api_key else ''})")
        server.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for sock in sockets:
            sock.close()
