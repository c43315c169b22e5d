"""The Open Inference Protocol's (KServe V2) wire format: the documented bodies, parsing an infer request
into z and y, and encoding the response. The routes are in service/routes/v2.py.

Tensor data arrives as JSON (`data`, row-major, flat or nested as [batch][width]) or, with Triton's binary
tensor data extension, as raw little-endian bytes after a JSON header of `Inference-Header-Content-Length`
bytes. The output is the model's own (float32 intensities in [0, 1], [N, 1, 28, 28]), exactly what ONNX
Runtime returns on the exported file. Every malformed request is an ApiError 400 naming the input.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ApiError
from service.manifest import ModelEntry

PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT = "image"
ONE_HOT_TOLERANCE = 1e-4  # y rows must sum to 1 within this (float32 blends of one-hots)


# --- the OpenAPI description of the protocol's bodies (the parsing below is by hand: the binary mode
# puts bytes after the JSON, and errors must be 400 {"error"}, not FastAPI's 422) ---------------------

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TensorParameters(_Open):
    binary_data_size: int | None = Field(None, ge=0, description="bytes of this tensor after the JSON header "
                                                                 "(binary tensor data extension)")


class InputTensor(BaseModel):
    name: str = Field(description="z (latent vectors) or y (class vectors of a conditional model)")
    shape: list[int] = Field(min_length=2, max_length=2, description="[batch, width]")
    datatype: str = Field(json_schema_extra={"enum": ["FP32"]}, description="FP32 only")
    data: list[Any] | None = Field(None, description="row-major values (flat or nested); omitted when the "
                                                     "tensor is sent as binary data")
    parameters: TensorParameters | None = None


class OutputParameters(_Open):
    binary_data: bool | None = Field(None, description="return this output as binary data")


class RequestedOutput(BaseModel):
    name: str = Field(json_schema_extra={"enum": [OUTPUT]})
    parameters: OutputParameters | None = None


class RequestParameters(_Open):
    binary_data_output: bool | None = Field(None, description="return every output as binary data")


class InferRequest(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    parameters: RequestParameters | None = None
    inputs: list[InputTensor] = Field(min_length=1, max_length=2)
    outputs: list[RequestedOutput] | None = Field(None, max_length=1)


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class ErrorBody(BaseModel):
    error: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody, "description": text} for status, text in (
    (400, "a malformed request or input: the message names the input and what is wrong"),
    (404, "no such model or version"),
    (413, "the body is larger than DIGITGEN_MAX_BODY_BYTES"),
    (500, "the model failed on this input (the reason is logged)"),
    (503, "not ready, or the model's queue is full (Retry-After)"),
    (504, "no answer within DIGITGEN_REQUEST_TIMEOUT_S"))}


def request_body_doc() -> dict:
    """The infer body's JSON schema, its definitions inlined (the route documents it by hand)."""
    schema = InferRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


# Before versions every model answered as version "1": a client that still asks for it gets the version the
# model serves unpinned (the answer then names the real one).
LEGACY_VERSION = "1"
MAX_ABS_INPUT = 1e4  # a standard normal draw is within 10 with certainty; far past it a model overflows to NaN


# --- parsing and validation ---------------------------------------------------------------------------

def model_metadata(entry: ModelEntry, versions: list[str]) -> dict:
    """The model's metadata: `versions`, every version served (the manifest's content-derived versions)."""
    inputs = [{"name": "z", "datatype": "FP32", "shape": [-1, entry.latent_dim]}]
    if entry.conditional:
        inputs.append({"name": "y", "datatype": "FP32", "shape": [-1, entry.num_classes]})
    return {"name": entry.name, "versions": versions, "platform": PLATFORM, "inputs": inputs,
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, *entry.image_shape]}]}


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        cut = len(body)
    else:
        try:
            cut = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH}: {header_length!r} is not an integer") from None
        if not 0 < cut <= len(body):
            raise _bad(f"{HEADER_LENGTH}: {cut} is outside the body's {len(body)} bytes")
    try:
        header = json.loads(body[:cut])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(f"the request is not JSON: {err}") from None
    except ValueError as err:  # an integer past the parser's digit limit
        raise _bad(f"the request holds a number the service does not take: {str(err)[:120]}") from None
    except RecursionError:  # nesting deeper than the parser takes
        raise _bad("the request's JSON nests too deeply") from None
    if not isinstance(header, dict):
        raise _bad("the request must be a JSON object with `inputs`")
    return header, body[cut:]


def _tensor(spec: Any, binary: bytes, offset: int, widths: dict[str, int], max_n: int
            ) -> tuple[str, np.ndarray, int]:
    """One input tensor as float32 [batch, width], and the binary offset after it."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _bad("each input needs a `name`")
    name = spec["name"]
    if name not in widths:
        raise _bad(f"input {name!r}: this model takes {' and '.join(widths)}")
    if spec.get("datatype") != "FP32":
        raise _bad(f"input {name!r}: datatype {spec.get('datatype')!r}; this model takes FP32")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise _bad(f"input {name!r}: shape {shape!r}; expected [batch, {widths[name]}]")
    if shape[1] != widths[name] or shape[0] < 1:
        raise _bad(f"input {name!r}: shape {shape}; expected [batch >= 1, {widths[name]}]")
    if shape[0] > max_n:  # before any data is converted
        raise _bad(f"input {name!r}: batch {shape[0]} is more than this service's largest, {max_n} (DIGITGEN_MAX_N)")
    count = shape[0] * shape[1]
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad(f"input {name!r}: `parameters` must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != 4 * count:
            raise _bad(f"input {name!r}: binary_data_size {size!r}; shape {shape} of FP32 is {4 * count} bytes")
        if offset + size > len(binary):
            raise _bad(f"input {name!r}: binary_data_size {size} but only {len(binary) - offset} bytes are left")
        values = np.frombuffer(binary, dtype="<f4", count=count, offset=offset).astype(np.float32)
        offset += size
    else:
        if "data" not in spec:
            raise _bad(f"input {name!r}: no `data` and no binary_data_size")
        flat = _flatten(spec["data"], name)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise _bad(f"input {name!r}: `data` must hold numbers only")
        if len(flat) != count:
            raise _bad(f"input {name!r}: {len(flat)} values for shape {shape} ({count})")
        try:
            with np.errstate(over="ignore"):  # beyond float32's range: inf, refused just below
                values = np.array(flat, dtype=np.float64).astype(np.float32)
        except OverflowError:  # an integer beyond even float64's range
            raise _not_finite(name) from None
    if not (np.abs(values) <= MAX_ABS_INPUT).all():  # one pass: NaN and infinity fail it too
        if not np.isfinite(values).all():
            raise _not_finite(name)
        raise _bad(f"input {name!r}: values must lie within +-{MAX_ABS_INPUT:g} (z is standard normal noise, y a "
                   f"class blend); {float(np.abs(values).max()):.3g} is not a latent this model was trained near")
    return name, values.reshape(shape), offset


def _not_finite(name: str) -> ApiError:
    return _bad(f"input {name!r}: values must be finite (no NaN or infinity, none beyond float32's range)")


def _flatten(data: Any, name: str) -> list:
    """The values of a flat list or of a list of rows ([batch][width]), row-major."""
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: `data` must be a list")
    if not any(isinstance(row, list) for row in data):
        return data
    if not all(isinstance(row, list) for row in data):
        raise _bad(f"input {name!r}: `data` mixes rows and values")
    flat = [value for row in data for value in row]
    if any(isinstance(value, list) for value in flat):
        raise _bad(f"input {name!r}: `data` nests deeper than its shape's two dimensions")
    return flat


def parse_infer(header: dict, binary: bytes, entry: ModelEntry, max_n: int
                ) -> tuple[np.ndarray, np.ndarray | None, bool, str | None]:
    """z, y, whether the output goes back as binary data, and the request id."""
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("`id` must be a string")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("`inputs` must be a non-empty list")
    widths = {"z": entry.latent_dim} | ({"y": entry.num_classes} if entry.conditional else {})
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for spec in inputs:
        name, values, offset = _tensor(spec, binary, offset, widths, max_n)
        if name in tensors:
            raise _bad(f"input {name!r} is given twice")
        tensors[name] = values
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data after the last input's")
    missing = [name for name in widths if name not in tensors]
    if missing:
        raise _bad(f"input {missing[0]!r} is missing: model {entry.name!r} takes {' and '.join(widths)}")
    z, y = tensors["z"], tensors.get("y")
    if y is not None:
        if len(y) != len(z):
            raise _bad(f"input 'y': batch {len(y)} differs from z's {len(z)}")
        if (y < 0).any() or (y > 1).any():
            raise _bad("input 'y': values must lie in [0, 1] (a one-hot class or a convex blend)")
        sums = y.astype(np.float64).sum(axis=1)
        if (np.abs(sums - 1) > ONE_HOT_TOLERANCE).any():
            row = int(np.argmax(np.abs(sums - 1)))
            raise _bad(f"input 'y': row {row} sums to {sums[row]:.6g}; each row must sum to 1")
    return z, y, _binary_output(header), request_id


def _binary_output(header: dict) -> bool:
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("`parameters` must be an object")
    binary = parameters.get("binary_data_output", False)
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise _bad("`outputs` must be a list")
        for out in outputs:
            if not isinstance(out, dict) or out.get("name") != OUTPUT:
                name = out.get("name") if isinstance(out, dict) else out
                raise _bad(f"output {name!r}: the model's only output is {OUTPUT!r}")
            options = out.get("parameters") or {}
            if not isinstance(options, dict):
                raise _bad(f"output {OUTPUT!r}: `parameters` must be an object")
            binary = options.get("binary_data", binary)
    if not isinstance(binary, bool):
        raise _bad(f"binary_data: {binary!r} is not true or false")
    return binary


def infer_response(output: np.ndarray, model: str, version: str, request_id: str | None, binary: bool) -> Response:
    """The protocol's response: the output tensor as JSON data or as binary data after the JSON header.
    Runs on an encode thread."""
    output = np.ascontiguousarray(output, dtype="<f4")
    tensor: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(output.shape)}
    body: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        body["id"] = request_id
    if not binary:  # orjson writes the float32 array itself: 1.1 ms for 64 images, where json took 21 ms
        tensor["data"] = output.ravel()
        return Response(orjson.dumps(body | {"outputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")
    tensor["parameters"] = {"binary_data_size": output.nbytes}
    header = json.dumps(body | {"outputs": [tensor]}, separators=(",", ":")).encode()
    return Response(header + output.tobytes(), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


# --- the same protocol over gRPC (service/protocol/inference.proto) -----------------------------------------

def grpc_header(request) -> tuple[dict, bytes]:
    """A ModelInferRequest as the JSON header and binary data that `parse_infer` reads, so both transports
    share one validation and one set of messages: `raw_input_contents` (one entry per input, in order) are
    the binary tensor data; otherwise each input's `contents.fp32_contents` its `data`."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _bad(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        spec: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            spec["parameters"] = {"binary_data_size": len(raw[i])}
        else:
            spec["data"] = list(tensor.contents.fp32_contents)
        inputs.append(spec)
    header: dict[str, Any] = {"inputs": inputs, "outputs": [{"name": o.name} for o in request.outputs] or None}
    if request.id:
        header["id"] = request.id
    return header, b"".join(raw)


def grpc_infer_response(output: np.ndarray, model: str, version: str, request_id: str | None, messages) -> Any:
    """The ModelInferResponse: the output tensor's metadata and its bytes in raw_output_contents (what
    Triton answers over gRPC). Runs on an encode thread."""
    output = np.ascontiguousarray(output, dtype="<f4")
    response = messages.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    tensor = response.outputs.add(name=OUTPUT, datatype="FP32")
    tensor.shape.extend(output.shape)
    response.raw_output_contents.append(output.tobytes())
    return response
