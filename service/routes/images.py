"""/sample, /generate and /interpolate: draw z (and y) from the query with `sampling`, run them on the
model's batcher, and answer the images as a PNG grid, JSON of base64 PNGs, or a GIF (encoded on an
encode thread by `render`, so the event loop only moves bytes)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from service import caching, dispatch, imaging, sampling
from service.config import Settings
from service.modelset import ModelSet
from service.queries import openapi_query, query_models
from service.runtime.model import ModelRuntime

GIF_FRAME_MS = 120

IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "application/json": {}},
          "description": "format=png: one PNG grid (X-Seed header); format=json: "
                         '{"model", "seed", "width", "height", "images": [base64 PNG, ...]}. With a seed: a '
                         "strong ETag and Cache-Control (a year, immutable, when the model is named; a minute "
                         "when the default model answers; private when API keys are on); without: no-store"},
    304: {"description": "a seeded request whose If-None-Match holds its ETag: no body, the model not run"},
    404: {"description": "unknown model; the message lists the available ones"},
    422: {"description": "a parameter out of range or not applicable; the message names it"},
    503: {"description": "the model's queue is full (Retry-After says when to try again), or no model "
                         "can serve this endpoint"},
    504: {"description": "no answer within DIGITGEN_REQUEST_TIMEOUT_S"},
}


def query_error(param: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own validation shape, so clients parse one format."""
    return HTTPException(422, detail=[{"loc": ["query", param], "msg": message, "type": "value_error"}])


def check_classes(model: ModelRuntime, **digits: int | None) -> None:
    """Each given class parameter applies to this model and is one of its classes, or a 422 naming it."""
    entry = model.entry
    for param, value in digits.items():
        if value is None:
            continue
        if not entry.conditional:
            raise query_error(param, f"model {model.name!r} is not conditional: it takes no class")
        if value >= entry.num_classes:
            raise query_error(param, f"model {model.name!r} has classes 0-{entry.num_classes - 1}")


class Seeded:
    """A request's seed and its caching headers; the 304 to answer at once when the client holds the ETag."""

    def __init__(self, request: Request, model: ModelRuntime, endpoint: str, q):
        self.seed = sampling.new_seed() if q.seed is None else q.seed
        self.headers, self.not_modified = {"Cache-Control": caching.UNSEEDED}, None
        if q.seed is None:
            return
        params = q.model_dump() | {"model": model.name, "version": model.entry.version}
        tag = caching.etag(model.entry.sha256, endpoint, params)
        keyed = request.app.state.settings.api_keys_file is not None
        self.headers = {"ETag": tag, "Cache-Control": caching.cache_control(q.version is not None, keyed)}
        if caching.matches(request.headers.get("if-none-match"), tag):
            self.not_modified = Response(status_code=304, headers=self.headers)


def render(images: np.ndarray, fmt: str, nrow: int, scale: int, info: dict, image_shape: tuple[int, int, int]
           ) -> Response:
    """One request's images as its response: a PNG grid, a GIF, or JSON with one base64 PNG per image."""
    headers = {"X-Model": info["model"], "X-Model-Version": info["version"], "X-Seed": str(info["seed"]),
               "X-Truncation": str(info["truncation"])}
    if "seed_to" in info:
        headers["X-Seed-To"] = str(info["seed_to"])
    if fmt == "json":
        return JSONResponse({**info, "width": image_shape[2] * scale, "height": image_shape[1] * scale,
                             "images": imaging.png_list(images, scale)}, headers=headers)
    if fmt == "gif":
        return Response(imaging.gif_bytes(images, scale, GIF_FRAME_MS), media_type="image/gif", headers=headers)
    return Response(imaging.png_grid(images, nrow, scale), media_type="image/png", headers=headers)


def router(settings: Settings) -> APIRouter:
    routes = APIRouter(tags=["Images"])
    SampleQuery, GenerateQuery, InterpolateQuery = query_models(settings)

    @routes.get("/sample", responses=IMAGE_RESPONSES, summary="Random digits",
                openapi_extra=openapi_query(SampleQuery))
    async def sample(request: Request):
        """n images from a model. A conditional model draws a random class per image (listed in JSON as `digits`)."""
        return await answer(request, SampleQuery.parse(request.query_params), "sample", sample_job)

    @routes.get("/generate", responses=IMAGE_RESPONSES, summary="Digits of one class",
                openapi_extra=openapi_query(GenerateQuery))
    async def generate(request: Request):
        """n images of one digit from a conditional model."""
        return await answer(request, GenerateQuery.parse(request.query_params), "generate", generate_job,
                            check_generate)

    @routes.get("/interpolate", responses=IMAGE_RESPONSES | {200: {
        "content": {"image/png": {}, "image/gif": {}, "application/json": {}},
        "description": "the frames as one strip PNG, an animated GIF, or JSON with one base64 PNG per frame"}},
        summary="A walk between two latent points and/or two classes", openapi_extra=openapi_query(InterpolateQuery))
    async def interpolate(request: Request):
        """Frames from the z of `seed` to the z of `seed_to` and, for a conditional model, from class `digit`
        to class `digit_to` with the same z, or both at once."""
        return await answer(request, InterpolateQuery.parse(request.query_params), "interpolate", walk_job,
                            check_walk)

    return routes


# A job: the request's images, how they are laid out, how their inputs are drawn (on the batch thread) and
# what the response reports about them: (images, nrow, inputs, info).
Job = tuple[int, int, Callable[[], tuple[np.ndarray, "np.ndarray | None"]], dict]


async def answer(request: Request, q, endpoint: str, job: Callable[[ModelRuntime, Any, int], Job],
                 check: Callable[[ModelSet, ModelRuntime, Any], None] | None = None) -> Response:
    """Every image route: the model, its checks (422s), the 304 of a revalidation, else the job run on the
    model's batcher and its response with the caching headers."""
    models = dispatch.model_set(request)
    model = dispatch.model_for(models, q.model, endpoint, q.version)
    if check is not None:
        check(models, model, q)
    seeded = Seeded(request, model, endpoint, q)
    if seeded.not_modified:
        return seeded.not_modified
    size, nrow, inputs, info = job(model, q, seeded.seed)
    finish = partial(render, fmt=q.format, nrow=nrow, scale=q.scale, info=info, image_shape=model.entry.image_shape)
    response = await dispatch.run(models, model, size, inputs, finish, dispatch.settings(request).request_timeout_s,
                                  scope=request.scope)
    response.headers.update(seeded.headers)
    ignored = type(q).ignored(request.query_params)
    if ignored:
        response.headers["X-Ignored-Parameters"] = ignored
    return response


def sample_job(model: ModelRuntime, q, seed: int) -> Job:
    entry = model.entry
    info = {"model": model.name, "version": model.entry.version, "seed": seed, "truncation": q.truncation}
    classes = sampling.random_classes(seed, q.n, entry.num_classes) if entry.conditional else None
    if classes is not None:
        info["digits"] = classes.tolist()

    def inputs():
        y = None if classes is None else sampling.one_hot(classes, entry.num_classes)
        return sampling.latents(seed, q.n, entry.latent_dim, q.truncation), y
    return q.n, q.nrow, inputs, info


def check_generate(models: ModelSet, model: ModelRuntime, q) -> None:
    if not model.entry.conditional:
        raise query_error("model", f"model {model.name!r} is not conditional; /generate needs one of: "
                                   f"{', '.join(models.conditional()) or 'none loaded'}")
    check_classes(model, digit=q.digit)


def generate_job(model: ModelRuntime, q, seed: int) -> Job:
    entry = model.entry
    info = {"model": model.name, "version": model.entry.version, "seed": seed, "digit": q.digit, "truncation": q.truncation}

    def inputs():
        return (sampling.latents(seed, q.n, entry.latent_dim, q.truncation),
                sampling.one_hot([q.digit] * q.n, entry.num_classes))
    return q.n, q.nrow, inputs, info


def check_walk(models: ModelSet, model: ModelRuntime, q) -> None:
    check_classes(model, digit=q.digit, digit_to=q.digit_to)


def walk_job(model: ModelRuntime, q, seed: int) -> Job:
    """/interpolate: the ends (seed_to defaulted; for a conditional model, the classes) and the walk."""
    seed_to = q.seed_to
    if seed_to is None:
        seed_to = seed if q.digit_to is not None else (seed + 1) % (sampling.MAX_SEED + 1)
    info = {"model": model.name, "version": model.entry.version, "seed": seed, "seed_to": seed_to, "steps": q.steps,
            "method": q.method,
            "truncation": q.truncation}
    if model.entry.conditional:
        digit = int(sampling.random_classes(seed, 1, model.entry.num_classes)[0]) if q.digit is None else q.digit
        info |= {"digit": digit, "digit_to": digit if q.digit_to is None else q.digit_to}
    return q.steps, q.steps, partial(walk_inputs, model, q, info), info


def walk_inputs(model: ModelRuntime, q, info: dict):
    """z along the walk and, for a conditional model, the class vectors blended along it."""
    entry = model.entry
    z = sampling.walk(sampling.latents(info["seed"], 1, entry.latent_dim, q.truncation)[0],
                      sampling.latents(info["seed_to"], 1, entry.latent_dim, q.truncation)[0], q.steps, q.method)
    if not entry.conditional:
        return z, None
    ends = sampling.one_hot([info["digit"], info["digit_to"]], entry.num_classes)
    return z, sampling.linear(ends[0], ends[1], np.linspace(0.0, 1.0, q.steps))
