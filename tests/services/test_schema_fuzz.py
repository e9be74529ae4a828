"""Schemathesis against the service's own OpenAPI schema: no generated request, valid (positive) or
invalid (negative), gets a 5xx, and every answer is one the schema documents. Bounded:
`MAX_EXAMPLES` per operation and mode, every operation, derandomized (the same cases each run)."""

from __future__ import annotations

import logging
from collections import Counter

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import API_KEY, Service

log = logging.getLogger(__name__)
MAX_EXAMPLES = 20
# no 5xx, and every answer as the schema documents it: status code, media type, body
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _fuzz(operation: schemathesis.APIOperation, mode: GenerationMode, cases: Counter[str]) -> None:
    """Run `MAX_EXAMPLES` generated cases of one operation in one mode, each checked for a 5xx."""
    name = f"{operation.method.upper()} {operation.path} {mode.value}"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        cases[name] += 1
        case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, checks=CHECKS, timeout=60)

    try:
        fuzz()
    except Unsatisfiable:  # negative mode: an operation with no input has nothing to make invalid
        assert mode is GenerationMode.NEGATIVE, name


def test_no_generated_request_gets_a_server_error(service: Service) -> None:
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 11
    cases: Counter[str] = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, cases)
    log.warning("schemathesis ran %d cases over %d operations", sum(cases.values()), len(operations))
    print(f"schemathesis: {sum(cases.values())} cases: {dict(cases)}")
    assert {name.rsplit(" ", 1)[0] for name in cases} == {f"{o.method.upper()} {o.path}" for o in operations}
