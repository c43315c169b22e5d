"""Every operation of the OpenAPI document, fuzzed with schemathesis (property-based: schema-valid and
schema-violating requests) against `python -m service`, and the infer bodies and headers no schema
describes, sent with hypothesis.

Checks: schemathesis's defaults (no 5xx; status codes, content types, headers and bodies as documented; no
schema-violating request accepted; ...); for the hostile bodies and headers, a 4xx with the protocol's
{"error"} body or a 200, never a 5xx. The path and query parameters that name a model draw from the
served models' names (and one unknown name), so the fuzzing reaches every operation's body rather than
its 404.

The suite's quick run: the tiny fixture models, DIGITGEN_FUZZ_EXAMPLES=25 examples per operation and
phase. `make fuzz`: the bundled models and 400 examples each (over 5,000 cases; it prints the count).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import running_service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_fixtures import write_models_dir

from service.app import create_app
from service.config import Settings
from service.manifest import load_manifest

schemathesis = pytest.importorskip("schemathesis")  # the dev extra

EXAMPLES = int(os.environ.get("DIGITGEN_FUZZ_EXAMPLES", "25"))  # per operation and phase
BUNDLED = os.environ.get("DIGITGEN_FUZZ_MODELS_DIR")  # make fuzz: the bundled models
LIMITS = {"max_n": "8", "max_steps": "8", "max_scale": "2",  # small images: many examples a second
          "body_timeout_s": "2"}  # a body the headers promise and never send: a 408 before the client gives up
FIXTURE_NAMES = ["gan", "cgan"]  # tests/onnx_fixtures.py: write_models_dir
CASES = {"schema": 0, "bodies": 0, "headers": 0}


def served_names() -> list[str]:
    return [m.name for m in load_manifest(Path(BUNDLED)).models] if BUNDLED else FIXTURE_NAMES


def with_model_names(document: dict, names: list[str]) -> dict:
    """The document with every model-naming parameter drawn from `names` and one unknown name (and, for
    the optional `model` query parameter, the empty value, which like an omitted one means the default)."""
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] in ("name", "model"):
                    extra = [""] if parameter["in"] == "query" else []
                    parameter["schema"] = {"type": "string", "enum": names + ["no-such-model"] + extra}
    return document


# The document the server publishes, built the same way (its bounds come from the same settings).
schema = schemathesis.openapi.from_dict(with_model_names(
    create_app(Settings(models_dir=Path(tempfile.gettempdir()), **{k: int(v) for k, v in LIMITS.items()}))
    .openapi(), served_names()))
schema.config.phases.coverage.generate_duplicate_query_parameters = True  # model=a&model=b
# A schema-valid request may still break a rule between parameters that OpenAPI cannot state (a digit on an
# unconditional model, /generate of one, a V2 shape that disagrees with its data): those are the
# documented 422 (image routes) and 400 (V2), each naming the parameter, and count as accepted data.
acceptance = schema.config.checks.positive_data_acceptance
acceptance.expected_statuses = [*acceptance.expected_statuses, "400", "422"]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, request):
    if BUNDLED:
        folder = Path(BUNDLED)
    else:
        folder = tmp_path_factory.mktemp("fuzz") / "exported"
        write_models_dir(folder)
    with running_service(folder, **LIMITS) as service:
        yield service.url
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"fuzz: {sum(CASES.values())} cases ({CASES}), {EXAMPLES} examples per operation")


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


@pytest.fixture(scope="module")
def send(base_url):
    """Send a request as raw bytes (an HTTP client library would refuse to send the worst of them) and
    read the reply: (method, path, headers, body) -> Reply."""
    host, port = base_url.removeprefix("http://").split(":")

    def request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Reply:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            lines.append(f"Content-Length: {len(body)}")
        framed = "Content-Length" in headers or "Transfer-Encoding" in headers  # maybe not what is sent
        with socket.create_connection((host, int(port)), timeout=5 if framed else 30) as sock:
            sock.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            except TimeoutError:  # the server waits for the rest of a body the headers promised
                assert framed and not received, f"no complete answer: {received[:200]!r}"
                return Reply(0, b"")
        head, _, content = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), f"no HTTP answer: {received[:200]!r}"
        return Reply(int(head.split()[1]), content)
    return request


@schema.parametrize()
@FUZZ
def test_every_operation_keeps_its_contract(case, base_url):
    CASES["schema"] += 1
    case.call_and_validate(base_url=base_url)


# --- what no schema generates: arbitrary JSON, deep nesting, stray bytes, hostile headers ---------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=40)
tensor_specs = st.fixed_dictionaries({"name": st.sampled_from(["z", "y", "x"]),
                                      "shape": st.lists(st.integers(-2, 10**10), max_size=3),
                                      "datatype": st.sampled_from(["FP32", "FP16", "INT64", 7])},
                                     optional={"data": json_values,
                                               "parameters": st.dictionaries(st.just("binary_data_size"),
                                                                             st.integers(-8, 4096))})
infer_bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"inputs": st.lists(tensor_specs, max_size=3)},
                          optional={"outputs": json_values, "parameters": json_values, "id": json_values}
                          ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 20000).map(lambda depth: b'{"inputs": [{"name": "z", "data": ' + b"[" * depth + b"]" * depth + b"}]}"),
    st.binary(max_size=512))
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=24)


def assert_refused_or_served(reply: Reply, protocol: bool) -> None:
    """Never a 5xx; every refusal in the service's documented JSON shape, the HTTP parser's own included
    (service/http_protocol.py). A reply of 0: the server still waits for a body the headers promised."""
    assert reply.status < 500, f"{reply.status}: {reply.body[:300]!r}"
    if reply.status >= 400:
        assert ("error" if protocol else "detail") in reply.json(), reply.body[:300]


@given(body=infer_bodies, name=st.sampled_from(served_names()),
       header_length=st.none() | st.integers(-5, 600).map(str) | header_values)
@FUZZ
def test_infer_bodies_beyond_the_schema_are_refused_with_a_400(send, body, name, header_length):
    CASES["bodies"] += 1
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    assert_refused_or_served(send("POST", f"/v2/models/{name}/infer", headers, body), protocol=True)


@given(path=st.sampled_from(["/sample?seed=3", "/generate?digit=2&seed=3", "/interpolate", "/models",
                             "/readyz", "/v2/models/{name}", "/v2/models/{name}/infer"]),
       name=st.sampled_from(served_names()),
       headers=st.dictionaries(st.sampled_from(["Authorization", "X-API-Key", "If-None-Match", "Content-Type",
                                                "Inference-Header-Content-Length", "Origin", "Accept",
                                                "Content-Length", "Transfer-Encoding"]), header_values, max_size=4))
@FUZZ
def test_hostile_headers_never_give_a_500(send, path, name, headers):
    CASES["headers"] += 1
    path = path.format(name=name)
    method = "POST" if path.endswith("/infer") else "GET"
    body = b'{"inputs": []}' if method == "POST" else b""
    assert_refused_or_served(send(method, path, headers, body), protocol=path.startswith("/v2"))


# --- the attacks that once got through (issue 29), each a fixed case -------------------------------------

@pytest.mark.parametrize("method, path, headers, body, status", [
    ("GET", "/sample?seed=1&truncation=" + "1" * 32_000 + "x", {}, b"", 414),  # slow pattern: past the line bound
    ("GET", "/sample?seed=" + "9" * 70, {}, b"", 422),  # a number longer than 64 characters: refused unparsed
    ("POST", "/v2/models/gan/infer", {"Content-Type": "application/json"},
     b'{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [' + b"9" * 5000 + b"]}]}", 400),
    ("POST", "/v2/models/gan/infer", {"Content-Type": "application/json"},
     b'{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [1' + b"0" * 400 + b"]}]}", 400),
    ("POST", "/v2/models/gan/infer", {"Content-Type": "application/json"},
     b'{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [' + b",".join([b"3.4e38"] * 8) + b"]}]}",
     400),
    ("GET", "/sample", {f"X-Filler-{i}": "b" * 1000 for i in range(40)}, b"", 431),
    ("POST", "/v2/models/gan/infer", {"Content-Length": "abc"}, b"", 400),
])
def test_the_attacks_that_got_through_are_refused_in_the_services_shape(send, method, path, headers, body, status):
    reply = send(method, path, headers, body)
    assert reply.status == status, reply.body[:200]
    assert_refused_or_served(reply, protocol=path.startswith("/v2"))

