"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis): no 500, no hang.

Runs in-process against the fake engine here (the HTTP layer's own robustness); the slow
variant in test_e2e_fuzz.py runs against the real server process and model.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from server.conftest import MODEL
from server.fake_engine import FakeEngine
from server.helpers import check_response
from shardline.engine.server import build_app

APP = build_app(FakeEngine(max_model_len=256), served_model_name=MODEL, api_key=None, max_body_bytes=64 * 1024)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=40,
    deterministic=True,
    database="none",
)


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_api_in_process(case: schemathesis.Case) -> None:
    response = case.call()
    check_response(response)
