"""``lag serve``: an OpenAI-compatible HTTP server over a LAG pipeline, with continuous batching (see
:mod:`llama_index_lag.batching`). Needs the ``serve`` extra: ``pip install "llama-index-lag[serve]"``."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError

REQUIRED = ("fastapi", "uvicorn", "sse_starlette", "prometheus_client")


def require_serve() -> None:
    """Raise :class:`MissingDependencyError` with the install command when the serve extra is missing."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f'lag serve needs {", ".join(missing)}: pip install "llama-index-lag[serve]"'
        )


def create_app(config: Any = None, **kwargs: Any) -> Any:
    """The FastAPI app (see :func:`llama_index_lag.serve.app.create_app`)."""
    require_serve()
    from .app import create_app as _create

    return _create(config, **kwargs)


def serve(
    config: Any = None, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs: Any
) -> None:
    """Run the server until interrupted (loopback unless ``host`` says otherwise)."""
    require_serve()
    import uvicorn

    uvicorn.run(create_app(config, **kwargs), host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def background_server(
    app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread for the block; yields its base URL (``port`` 0: a free one)."""
    require_serve()
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lag-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def read_api_keys(path: str | Path) -> tuple[str, ...]:
    """The API keys of a key file: one per line, blank lines and ``#`` comments ignored."""
    from ..errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError("API key file not found", path=path, field="api_key_file")
    keys = tuple(
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not keys:
        raise ConfigError("API key file holds no key", path=path, field="api_key_file")
    return keys


__all__ = ["background_server", "create_app", "read_api_keys", "require_serve", "serve"]
