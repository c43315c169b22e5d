"""A Python client for the image endpoints, sync and async (tritonclient covers the raw V2 tensors only).

    from service.client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as client:
        result = client.generate(digit=3, n=16, seed=1)
        result.images          # 16 PIL images; result.array(): uint8 [16, 28, 28]
        result.seed, result.model, result.version

`AsyncClient` has the same methods as coroutines. Each call asks for JSON (one PNG per image, with the seed,
model and version that answered). A 503 (full queue, still warming) or a connection that fails is retried
`retries` times, after the answer's Retry-After or a growing delay; any other error raises ServiceError
with the status and the service's message (which names the parameter at fault). It needs httpx, numpy and
Pillow, all in the base install; it imports nothing else of the service.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

RETRY_STATUSES = (502, 503, 504)
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0)


class ServiceError(Exception):
    """The service refused the request: `status` and its message (the parameter or input at fault)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


@dataclass(frozen=True)
class Images:
    """What one call returned: the images and how they were drawn."""
    images: list[Image.Image]
    model: str
    version: str
    seed: int
    info: dict = field(default_factory=dict)  # the rest of the answer: digit(s), truncation, seed_to, steps...
    pngs: list[bytes] = field(default_factory=list)  # each image's PNG file as the service encoded it

    def array(self) -> np.ndarray:
        """The images as uint8 [n, height, width]."""
        return np.stack([np.asarray(image.convert("L")) for image in self.images])

    @property
    def digits(self) -> list[int] | None:
        """The class of each image, for a conditional model (None otherwise)."""
        if "digits" in self.info:
            return list(self.info["digits"])
        return [self.info["digit"]] * len(self.images) if "digit" in self.info and "steps" not in self.info else None


def _query(**parameters: Any) -> dict[str, Any]:
    return {key: value for key, value in parameters.items() if value is not None} | {"format": "json"}


def _images(response: httpx.Response) -> Images:
    body = response.json()
    pngs = [base64.b64decode(data) for data in body.pop("images")]
    images: list[Image.Image] = [Image.open(io.BytesIO(png)) for png in pngs]
    for image in images:
        image.load()
    return Images(images, body.pop("model"), body.pop("version"), body.pop("seed"), body, pngs)


def _error(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()
        message = body.get("detail", body.get("error", response.text)) if isinstance(body, dict) else response.text
    except ValueError:
        message = response.text
    return ServiceError(response.status_code, message if isinstance(message, str) else str(message))


def _settled(response: httpx.Response | None, attempt: int, retries: int) -> bool:
    """True: the answer to return. False: try again (a 502/503/504 or a failed connection, tries left).
    Raises ServiceError for any other error, or the last retryable one."""
    if response is None:
        return False
    if response.status_code < 400:
        return True
    if response.status_code not in RETRY_STATUSES or attempt == retries:
        raise _error(response)
    return False


def _delay(response: httpx.Response | None, attempt: int) -> float:
    """Seconds before the next try: the answer's Retry-After (capped at 30 s), else a growing delay."""
    if response is not None:
        try:
            return min(30.0, max(0.0, float(response.headers.get("retry-after", ""))))
        except ValueError:
            pass
    return BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]


class _Base:
    def __init__(self, url: str, api_key: str | None, retries: int):
        self.url, self.retries = url.rstrip("/"), retries
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client(_Base):
    """The image endpoints over one HTTP connection pool; use it as a context manager, or close() it."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, retries: int = 3,
                 timeout_s: float = 30.0, transport: httpx.BaseTransport | None = None):
        super().__init__(url, api_key, retries)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout_s, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def sample(self, n: int = 1, seed: int | None = None, model: str | None = None, version: str | None = None,
               truncation: float | None = None) -> Images:
        """n images from a model (its default for /sample when None)."""
        return _images(self._get("/sample", _query(n=n, seed=seed, model=model, version=version,
                                                    truncation=truncation)))

    def generate(self, digit: int, n: int = 1, seed: int | None = None, model: str | None = None,
                 version: str | None = None, truncation: float | None = None) -> Images:
        """n images of one digit from a conditional model."""
        return _images(self._get("/generate", _query(digit=digit, n=n, seed=seed, model=model, version=version,
                                                      truncation=truncation)))

    def interpolate(self, steps: int = 8, seed: int | None = None, seed_to: int | None = None,
                    digit: int | None = None, digit_to: int | None = None, method: str | None = None,
                    model: str | None = None, version: str | None = None) -> Images:
        """The frames of a walk between two latent points and/or two classes."""
        return _images(self._get("/interpolate", _query(steps=steps, seed=seed, seed_to=seed_to, digit=digit,
                                                         digit_to=digit_to, method=method, model=model,
                                                         version=version)))

    def models(self) -> list[dict]:
        return self._get("/models", {}).json()["models"]

    def ready(self) -> bool:
        """Whether every worker serves its warmed models (/readyz), without retrying."""
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def _get(self, path: str, params: dict) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response: httpx.Response | None = self.http.get(path, params=params)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                response = None
            if _settled(response, attempt, self.retries):
                assert response is not None
                return response
            time.sleep(_delay(response, attempt))
        raise AssertionError("unreachable")


class AsyncClient(_Base):
    """Client's methods as coroutines, over one httpx.AsyncClient."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, retries: int = 3,
                 timeout_s: float = 30.0, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(url, api_key, retries)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout_s, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def sample(self, n: int = 1, seed: int | None = None, model: str | None = None,
                     version: str | None = None, truncation: float | None = None) -> Images:
        return _images(await self._get("/sample", _query(n=n, seed=seed, model=model, version=version,
                                                          truncation=truncation)))

    async def generate(self, digit: int, n: int = 1, seed: int | None = None, model: str | None = None,
                       version: str | None = None, truncation: float | None = None) -> Images:
        return _images(await self._get("/generate", _query(digit=digit, n=n, seed=seed, model=model,
                                                            version=version, truncation=truncation)))

    async def interpolate(self, steps: int = 8, seed: int | None = None, seed_to: int | None = None,
                          digit: int | None = None, digit_to: int | None = None, method: str | None = None,
                          model: str | None = None, version: str | None = None) -> Images:
        return _images(await self._get("/interpolate", _query(steps=steps, seed=seed, seed_to=seed_to, digit=digit,
                                                               digit_to=digit_to, method=method, model=model,
                                                               version=version)))

    async def models(self) -> list[dict]:
        return (await self._get("/models", {})).json()["models"]

    async def ready(self) -> bool:
        try:
            return (await self.http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _get(self, path: str, params: dict) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response: httpx.Response | None = await self.http.get(path, params=params)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                response = None
            if _settled(response, attempt, self.retries):
                assert response is not None
                return response
            await asyncio.sleep(_delay(response, attempt))
        raise AssertionError("unreachable")
