"""Errors the API answers on purpose, in the shape each protocol's clients parse: `{"error": message}`
under /v2 (the Open Inference Protocol) and `{"detail": message}` elsewhere (FastAPI's own shape)."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

V2_PREFIX = "/v2"


class ApiError(Exception):
    """A request answered with `status` and `message` (the message names the parameter or input at fault)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def body(path: str, message: str) -> dict:
    return {"error": message} if path == V2_PREFIX or path.startswith(V2_PREFIX + "/") else {"detail": message}


def encoded(path: str, message: str) -> bytes:
    """The error body as bytes, for plain ASGI middleware that answers before the app runs."""
    return json.dumps(body(path, message)).encode()


def route_path(scope) -> str:
    """The path the routes match: behind a proxy's prefix (root_path), what follows it."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def error_response(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(body(route_path(request.scope), err.message), status_code=err.status, headers=err.headers)


def client_gone(request: Request, err: Exception) -> Response:
    """The client left while its request was read (its body cut short): nobody receives an answer, so
    none is made and nothing is logged; /metrics counts it as 499, nginx's "client closed request"."""
    return Response(status_code=499)


def http_error_response(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no such route: 404; a route without that method: 405) in the same shapes:
    under /v2 `{"error": ...}`, which tritonclient parses, where FastAPI would answer `{"detail": ...}`."""
    return JSONResponse(body(route_path(request.scope), str(err.detail)), status_code=err.status_code,
                        headers=getattr(err, "headers", None))
