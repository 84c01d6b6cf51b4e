"""Two ASGI middlewares around the app: a request-body size cap, and a JSON 500 for unexpected errors.

BodySizeLimit refuses a body larger than max_body_bytes with 413 in OpenAI's error shape: at once
when Content-Length says so (the body is never read), else while a chunked body streams in (the
handler's read fails as soon as the running total passes the cap), so at most max_body_bytes of it
is ever buffered. InternalErrors turns an exception that escaped every handler into a logged JSON
500 on a connection that stays open; Starlette's own ServerErrorMiddleware re-raises after its 500,
which makes uvicorn drop the keep-alive connection.
"""
from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lserve.server.errors import error_response

logger = logging.getLogger("lserve.server")


class RequestBodyTooLarge(HTTPException):
    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, f"The request body is larger than this server's limit of {max_body_bytes} bytes "
                              "(lserve serve --max-request-body-bytes).")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # a malformed header never gets past the HTTP parser anyway
                if declared > limit:
                    error = RequestBodyTooLarge(limit)
                    await error_response(413, error.detail)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestBodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


class InternalErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            if started:  # a response already on the wire cannot be replaced: let the connection close
                raise
            logger.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            response = error_response(500, f"internal server error: {type(error).__name__}: {error}")
            await response(scope, receive, send)
