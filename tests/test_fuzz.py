"""Every operation of the OpenAPI document, fuzzed with schemathesis (property-based: schema-valid and
schema-violating requests) against `python -m service` over the tiny fixture models.

Each operation gets a bounded number of examples, so the suite stays fast. Checks: schemathesis's
defaults (no 5xx; status codes, content types, headers and bodies as documented; no schema-violating
request accepted; ...).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from conftest import running_service
from onnx_fixtures import write_models_dir
from service.app import create_app
from service.config import Settings

schemathesis = pytest.importorskip("schemathesis")  # the dev extra

EXAMPLES = 25  # per operation and phase
LIMITS = {"max_n": "8", "max_steps": "8", "max_scale": "2"}  # small images: many examples a second

# The document the server publishes, built the same way (its bounds come from the same settings).
schema = schemathesis.openapi.from_dict(
    create_app(Settings(models_dir=Path(tempfile.gettempdir()), **{k: int(v) for k, v in LIMITS.items()}))
    .openapi())
schema.config.phases.coverage.generate_duplicate_query_parameters = True  # model=a&model=b


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "exported"
    write_models_dir(folder)
    with running_service(folder, **LIMITS) as service:
        yield service.url


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_keeps_its_contract(case, base_url):
    case.call_and_validate(base_url=base_url)
