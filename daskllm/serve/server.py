"""Running the app with uvicorn: in the foreground (`daskllm serve`) or in a background thread.

uvicorn is the ASGI server; FastAPI the framework: typed request models (pydantic) and one
handler per endpoint, the layout vLLM's OpenAI server uses, on a stack that is well kept.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time

from .app import build_app


def _config(app, log_level: str, **kwargs):
    import uvicorn
    # No websockets, no lifespan events: the LLM is started before the server and closed after.
    return uvicorn.Config(app, ws="none", lifespan="off", log_level=log_level, timeout_graceful_shutdown=5,
                          **kwargs)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, opened before the model loads so a busy port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(f"cannot listen on {host}:{port}: {reason}; choose another --port or --host") from e


def serve(llm, host: str = "127.0.0.1", port: int = 8000, *, sock=None, api_key=None, model_name=None,
          chat_template=None, log_level: str = "info"):
    """Serve `llm` until interrupted (Ctrl-C or SIGTERM), on `sock` if given (see `listen`)."""
    import uvicorn
    if not _is_loopback(host) and api_key is None:
        print(f"daskllm: warning: serving on {host} without --api-key: anyone who can reach this port "
              "can use the model", file=sys.stderr)
    app = build_app(llm, api_key=api_key, model_name=model_name, chat_template=chat_template)
    sock = sock or listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"daskllm: serving {app.state.model_name!r} at http://{shown}:{bound_port}/v1 (OpenAI API), "
          "with /health and /metrics; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(_config(app, log_level)).run(sockets=[sock])
    finally:
        sock.close()
        app.state.engine.close()


class ServerThread:
    """The server in a background thread of this process, on a free port of `host` by default.

    Example
    -------
    >>> with LLM("tests/fixtures/golden/llama") as llm, ServerThread(llm) as server:   # doctest: +SKIP
    ...     OpenAI(base_url=server.url, api_key="none").models.list()
    """

    def __init__(self, llm, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", **options):
        import uvicorn
        self.app = build_app(llm, **options)
        self._socket = listen(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(_config(self.app, log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="daskllm-serve", daemon=True)

    @property
    def url(self) -> str:
        """The OpenAI base URL (…/v1)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port} within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30):
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()
        self.app.state.engine.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
