"""Errors in OpenAI's JSON shape, with vLLM's "object": "error" (see protocol.ErrorResponse).

APIError is what handlers raise for a request's fault (4xx) or a retry (503); error_response and
error_event render one as a JSON body or a server-sent event. Bodies are ASCII JSON, so a message
that quotes the client's text renders even when that text holds a lone surrogate.
"""
from __future__ import annotations

import json
import re
from typing import Optional

from fastapi.responses import JSONResponse

from lserve.server import protocol as p

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
               413: "RequestTooLargeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


# The C++ core ends its messages with " [file:line]" (lserve/check.h): for developers, not clients.
_CORE_LOCATION = re.compile(r" \[[^\[\]]+:\d+\]$")


class APIError(Exception):
    """An error the client caused or must retry; rendered as the OpenAI error JSON with this status."""

    def __init__(self, status_code: int, message: str, param: Optional[str] = None) -> None:
        message = _CORE_LOCATION.sub("", message)
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: any str renders, lone surrogates included."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(status_code: int, message: str, param: Optional[str] = None) -> dict:
    error = p.ErrorInfo(message=message, type=ERROR_TYPES.get(status_code, "Error"), param=param, code=status_code)
    return p.ErrorResponse(error=error).model_dump()


def error_response(status_code: int, message: str, param: Optional[str] = None) -> JSONResponse:
    return AsciiJSONResponse(error_body(status_code, message, param), status_code=status_code)


def error_event(status_code: int, message: str) -> str:
    return f"data: {json.dumps(error_body(status_code, message), ensure_ascii=True)}\n\n"
