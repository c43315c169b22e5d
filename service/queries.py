"""The query parameters of the image endpoints, one pydantic model per endpoint.

The routes validate the whole query in one pydantic call rather than through FastAPI's per-parameter
dependency solving, which cost more than the rest of a request together (about 40 of 70 us in-process;
`tests/benchmarks/serve_throughput.py`). The errors keep FastAPI's own 422 shape, and `openapi_query`
documents the same fields in the OpenAPI schema, so clients see no difference.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Literal

from fastapi import HTTPException
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import sampling
from service.config import Settings

DEFAULT_NROW = 8


# What the OpenAPI schema promises: an integer is written as one ("7", "-3"; not "7.0", " 7" or "7_000",
# which pydantic's lax parsing would take), a number as a decimal or exponent literal.
# Each pattern is unambiguous (no two quantifiers compete for the same digits), so a match takes time linear
# in the value's length; a numeric value longer than MAX_NUMBER_CHARS is refused before any matching.
INTEGER = re.compile(r"-?[0-9]+")
NUMBER = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")
MAX_NUMBER_CHARS = 64
MAX_IGNORED_NAMED = 5  # unknown parameters named in X-Ignored-Parameters; the rest are counted
SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,40}")  # what a header may echo of a client's parameter name


def _pattern(annotation) -> re.Pattern | None:
    kinds = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) else {annotation}
    return INTEGER if int in kinds else NUMBER if float in kinds else None


_PATTERNS: dict[type, list[tuple[str, re.Pattern | None]]] = {}  # each query model's, worked out once


class QueryModel(BaseModel):
    # Unknown parameters are ignored, as FastAPI does; values arrive as strings and are parsed.
    model_config = ConfigDict(extra="ignore", frozen=True)

    @classmethod
    def parse(cls, query):
        """The validated query (a dict or Starlette's QueryParams), or a 422 naming each bad parameter in
        FastAPI's shape. A parameter given twice, or a number not written as the schema says, is refused."""
        problems = []
        for name, pattern in cls._written_as():
            values = query.getlist(name) if hasattr(query, "getlist") else [query[name]] if name in query else []
            if len(values) > 1:
                problems.append({"type": "value_error", "loc": ["query", name], "input": values,
                                 "msg": f"given {len(values)} times; give it once"})
            elif values and pattern and len(values[0]) > MAX_NUMBER_CHARS:
                problems.append({"type": "value_error", "loc": ["query", name], "input": values[0][:MAX_NUMBER_CHARS] + "...",
                                 "msg": f"at most {MAX_NUMBER_CHARS} characters"})
            elif values and pattern and not pattern.fullmatch(values[0]):
                kind = "an integer" if pattern is INTEGER else "a number"
                problems.append({"type": "value_error", "loc": ["query", name], "input": values[0],
                                 "msg": f"Input should be {kind}, written as one"})
        if problems:
            raise HTTPException(422, detail=problems)  # (the inputs are strings: nothing to encode)
        try:
            return cls.model_validate(query)
        except ValidationError as err:
            raise HTTPException(422, detail=jsonable_encoder(
                [{**e, "loc": ["query", *map(str, e["loc"])]} for e in err.errors(include_url=False)])) from None


    @classmethod
    def ignored(cls, query) -> str | None:
        """The parameters this endpoint does not take, for the X-Ignored-Parameters header (a typo such as
        `sed=7` is otherwise silent): each name with the field it most resembles, None when there are none.
        Ignored rather than refused, as FastAPI does: a cache-busting `_=...` must keep working."""
        unknown = [name for name in dict.fromkeys(query.keys()) if name not in cls.model_fields]
        if not unknown:
            return None
        shown = []
        for name in unknown[:MAX_IGNORED_NAMED]:
            if not SAFE_NAME.fullmatch(name):
                shown.append("(a name not shown)")
                continue
            close = difflib.get_close_matches(name, cls.model_fields, n=1, cutoff=0.6)
            shown.append(f"{name} (did you mean {close[0]}?)" if close else name)
        more = len(unknown) - MAX_IGNORED_NAMED
        return ", ".join(shown) + (f", and {more} more" if more > 0 else "")

    @classmethod
    def _written_as(cls) -> list[tuple[str, re.Pattern | None]]:
        """Each field and the pattern its raw value must match (None: any string), worked out once."""
        found = _PATTERNS.get(cls)
        if found is None:
            found = _PATTERNS[cls] = [(name, _pattern(field.annotation)) for name, field in cls.model_fields.items()]
        return found


def query_models(settings: Settings) -> tuple[type[QueryModel], type[QueryModel], type[QueryModel]]:
    """The models of /sample, /generate and /interpolate, with the bounds of these settings."""
    seed_description = ("random seed; the same parameters and seed give byte-identical output. "
                        "Omitted: drawn and returned (X-Seed header, `seed` in JSON)")

    class Common(QueryModel):
        model: str | None = Field(None, description="model name (GET /models); omitted: the manifest's default "
                                                    "for this endpoint")
        version: str | None = Field(None, pattern=r"^[0-9a-f]{12}$",
                                    description="one version of the model (GET /models/{name} lists them): the "
                                                "answer for a seed never changes, and is cached for a year. "
                                                "Omitted: the version the model serves now (X-Model-Version)")
        seed: int | None = Field(None, ge=0, le=sampling.MAX_SEED, description=seed_description)
        scale: int = Field(1, ge=1, le=settings.max_scale,
                           description=f"integer upscaling of each 28x28 image, nearest neighbour, "
                                       f"1-{settings.max_scale}")
        truncation: float = Field(1.0, gt=0, le=1,
                                  description="0 < t <= 1: z is scaled by t toward the mean; lower t draws "
                                              "cleaner, less varied digits (1: the model's own distribution). "
                                              "Reported in X-Truncation and JSON")

    class Images(Common):
        n: int = Field(1, ge=1, le=settings.max_n, description=f"number of images, 1-{settings.max_n}")
        format: Literal["png", "json"] = Field("png", description="png: one grid image; json: one base64 PNG "
                                                                   "per image")
        nrow: int = Field(DEFAULT_NROW, ge=1, le=settings.max_n, description="images per row of the PNG grid")

    class SampleQuery(Images):
        pass

    class GenerateQuery(Images):
        digit: int = Field(ge=0, le=9, description="the class to draw, 0-9")

    class InterpolateQuery(Common):
        steps: int = Field(8, ge=2, le=settings.max_steps,
                           description=f"frames, both ends included, 2-{settings.max_steps}")
        seed_to: int | None = Field(None, ge=0, le=sampling.MAX_SEED,
                                    description="seed of the end point's z. Omitted: the same z as `seed` when "
                                                "digit_to is given (a pure class blend), else seed + 1")
        digit: int | None = Field(None, ge=0, le=9, description="conditional models: the start class "
                                                                "(omitted: drawn from the seed)")
        digit_to: int | None = Field(None, ge=0, le=9, description="conditional models: the end class; the class "
                                                                   "vector is blended linearly (omitted: the "
                                                                   "start class)")
        method: Literal["slerp", "linear"] = Field("slerp", description="slerp (default) or linear path between "
                                                                        "the z")
        format: Literal["png", "json", "gif"] = Field("png", description="png: one strip; gif: animated; json: "
                                                                         "one base64 PNG per frame")

    return SampleQuery, GenerateQuery, InterpolateQuery


def openapi_query(model: type[QueryModel]) -> dict:
    """The model's fields as OpenAPI query parameters (`openapi_extra` of the route)."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        field = dict(field)
        description = field.pop("description", "")
        field.pop("title", None)
        parameters.append({"name": name, "in": "query", "required": name in required,
                           "description": description, "schema": field})
    return {"parameters": parameters}
