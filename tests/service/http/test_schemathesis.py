"""Property-based fuzzing of every operation in ``/openapi.json`` (Schemathesis): no input the schema
allows or nearly allows may produce a 5xx, and the service stays ready afterwards.

One narrow exemption: a request whose own ``timeout`` query parameter is below ``IMPOSSIBLE_TIMEOUT_S``
(Schemathesis likes ``5e-324``) gets the documented 504 ``deadline_exceeded``: the client asked for a deadline
no request can meet, and 504 is the answer the API documents for it. Any other 5xx fails the test.

Bounded for CI: ``MAX_EXAMPLES`` per operation, no Hypothesis database, no per-example deadline.
Schemathesis starts the app's lifespan once (fake engine) and calls it in-process.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python.asgi import get_client

from service.http.app import create_app
from service.settings import Settings

MAX_EXAMPLES = 100
IMPOSSIBLE_TIMEOUT_S = 0.5

APP = create_app(Settings(engine="fake", warmup=False, max_image_bytes=1_000_000, max_image_pixels=4_000_000))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def asked_impossible_deadline(case: schemathesis.Case, response: schemathesis.Response) -> bool:
    """The documented 504 for a client-requested deadline below :data:`IMPOSSIBLE_TIMEOUT_S`."""
    try:
        timeout = float((case.query or {}).get("timeout", "inf"))
    except (TypeError, ValueError):
        return False
    return (
        timeout < IMPOSSIBLE_TIMEOUT_S
        and response.status_code == 504
        and response.json()["error"]["code"] == "deadline_exceeded"
    )


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_for_any_generated_request(case: schemathesis.Case) -> None:
    response = case.call()
    if not asked_impossible_deadline(case, response):
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"
    with get_client(APP) as client:
        assert client.get("/readyz").status_code == 200
