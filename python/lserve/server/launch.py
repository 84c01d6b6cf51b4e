"""`lserve serve`: argument parsing and the uvicorn process around build_app.

Shutdown contract: SIGTERM or SIGINT stops accepting connections, answers new requests on open
connections with 503, lets running requests finish for --shutdown-grace seconds, then aborts the
rest (their streams end with finish_reason "abort"), stops the engine thread and exits with code 0.
"""
from __future__ import annotations

import argparse
import signal
from typing import Callable, Optional, Sequence, Union


def add_serve_parser(commands, add_engine_args: Callable, engine_from_args: Callable) -> argparse.ArgumentParser:
    """Registers `serve` on the CLI's subparsers; engine arguments come from the CLI's own helpers."""
    parser = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                 description="Serve a model over an OpenAI-compatible HTTP API "
                                             "(/v1/completions, /v1/chat/completions, /metrics, ...).")
    add_engine_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of requests that carry none (default: %(default)s)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    server.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) clients use in 'model' (default: --model)")
    server.add_argument("--max-pending-requests", type=int, default=4096,
                        help="queued + running sequences (prompts x n) beyond which the server answers 503; a "
                             "request that alone needs more gets 400 (default: %(default)s)")
    server.add_argument("--max-request-body-bytes", type=int, default=None,
                        help="larger request bodies get 413 (default: twice the longest prompt --max-model-len "
                             "tokens can spell, in bytes, plus 4 MiB)")
    server.add_argument("--shutdown-grace", type=float, default=5.0,
                        help="seconds running requests get to finish after SIGTERM (default: %(default)s)")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level (default: %(default)s)")
    server.add_argument("--quiet", action="store_true", help="no progress bar while loading")
    parser.set_defaults(handler=lambda args: _serve(args, engine_from_args))
    return parser


def _serve(args: argparse.Namespace, engine_from_args: Callable) -> int:
    for name, value, minimum in (("--port", args.port, 0), ("--max-pending-requests", args.max_pending_requests, 1),
                                 ("--max-request-body-bytes", args.max_request_body_bytes, 1)):
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    check_server_dependencies()  # before the model loads, which takes a while
    engine = engine_from_args(args)
    return run_server(engine, args.served_model_name or args.model, host=args.host, port=args.port,
                      log_level=args.log_level, max_pending_requests=args.max_pending_requests,
                      shutdown_grace_s=args.shutdown_grace, max_request_body_bytes=args.max_request_body_bytes)


def check_server_dependencies() -> None:
    """Imports what the server needs; RuntimeError in one line when the environment lacks any of it
    (`pip install lserve` installs all of it, so only a broken environment gets here)."""
    try:
        import uvicorn  # noqa: F401

        import lserve.server.app  # noqa: F401  (fastapi, starlette, pydantic)
    except ImportError as error:
        raise RuntimeError(f"lserve serve needs {error.name or error}, which is missing from this environment; "
                           "reinstall lserve (pip install lserve), which installs the server's dependencies") from None


def run_server(engine, served_model_name: Union[str, Sequence[str], None] = None, *, host: str = "127.0.0.1",
               port: int = 8000, log_level: str = "info", max_pending_requests: int = 4096,
               shutdown_grace_s: float = 5.0, max_request_body_bytes: Optional[int] = None) -> int:
    """Serves engine until SIGTERM/SIGINT; returns 0 after a graceful shutdown. Must run on the main thread."""
    import uvicorn

    from lserve.server.app import build_app

    app = build_app(engine, served_model_name, max_pending_requests=max_pending_requests,
                    shutdown_grace_s=shutdown_grace_s, max_request_body_bytes=max_request_body_bytes)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            app.state.engine_loop.begin_shutdown()  # only sets an attribute: safe in a signal handler
            super().handle_exit(sig, frame)

    # The grace period ends running requests cleanly; uvicorn's own timeout is only a backstop.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_grace_s + 5.0, timeout_keep_alive=5)
    server = Server(config)
    # After a signal-triggered shutdown uvicorn restores the previous handlers and re-raises the signal,
    # which under the default handlers kills the process (exit status 143 for SIGTERM). A graceful
    # shutdown is a success, so make the previous handlers no-ops for the duration.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


def _ignore_signal(sig: int, frame: Optional[object]) -> None:
    pass
