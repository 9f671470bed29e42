# mypy: disable-error-code="misc,untyped-decorator"
"""Locust load test for users who prefer Locust (``pip install snipserve[locust]``; not a core dependency).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 2 -t 2m

Environment: ``SNIPSERVE_LOAD_MIX`` (default ``1920x1080``, same syntax as ``python -m loadtest --mix``),
``SNIPSERVE_LOAD_IMAGES`` (a directory of images instead), ``SNIPSERVE_API_KEY`` (sent as X-API-Key),
``SNIPSERVE_LOAD_WAIT_S`` (think time per user, default 0).

Locust users are closed-loop: each waits for its answer before the next request, so Locust's latencies
suffer from coordinated omission under overload. For latency at a given arrival rate use
``python -m loadtest run --mode open``, which measures from the intended send time.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import HttpUser, between, task

from loadtest.images import directory_mix, parse_mix

_dir = os.environ.get("SNIPSERVE_LOAD_IMAGES")
MIX = directory_mix(Path(_dir)) if _dir else parse_mix(os.environ.get("SNIPSERVE_LOAD_MIX", "1920x1080"))
WAIT_S = float(os.environ.get("SNIPSERVE_LOAD_WAIT_S", "0"))


class DetectUser(HttpUser):
    """POSTs images from the mix to ``/v1/detect``; 503 and 504 count as failures with their reason."""

    wait_time = between(WAIT_S, WAIT_S)

    def on_start(self) -> None:
        key = os.environ.get("SNIPSERVE_API_KEY")
        if key:
            self.client.headers["X-API-Key"] = key

    @task
    def detect(self) -> None:
        image = random.choices(MIX, weights=[m.weight for m in MIX])[0]
        with self.client.post(
            "/v1/detect",
            data=image.data,
            headers={"content-type": image.media_type},
            name=f"/v1/detect [{image.name}]",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                code = response.json().get("error", {}).get("code", "") if response.content else ""
                response.failure(f"{response.status_code} {code}")
