"""lserve's OpenAI-compatible HTTP server (`lserve serve`): FastAPI app, engine thread, metrics.

    >>> from lserve.server import build_app
    >>> app = build_app(engine, "smollm2")   # serve with uvicorn, or `lserve serve --model ...`

Importing this package stays light (no FastAPI) so the CLI can register `serve` cheaply.
"""

__all__ = ["build_app", "run_server"]


def __getattr__(name):
    if name == "build_app":
        from lserve.server.app import build_app

        return build_app
    if name == "run_server":
        from lserve.server.launch import run_server

        return run_server
    raise AttributeError(f"module 'lserve.server' has no attribute {name!r}")
