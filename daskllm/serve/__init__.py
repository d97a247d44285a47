"""An OpenAI-compatible HTTP server on top of the engine (`daskllm serve`; needs the `serve` extra).

    from daskllm.serve import ServerThread, build_app, serve
"""
from .app import build_app
from .server import ServerThread, serve

__all__ = ["build_app", "serve", "ServerThread"]
