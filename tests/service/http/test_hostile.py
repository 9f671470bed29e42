"""Hostile requests against the real app (fake engine): every one is a 4xx naming the problem, never a 5xx,
and the service stays ready. Timing goals live in ``benchmarks/adversarial.py``, not here.

Families (issue 12): options (unicode digits, huge integers, deep nesting, 10^400, NaN, amplification);
transport and security cases are in the sections below.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.http.serving import json_depth, parse_levels
from service.plan import LevelSpec, PlanConfig, PlanError, plan
from tests.conftest import blob_image, encode
from tests.service.live_server import fake_app

HUGE_INT = "9" * 5000


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(fake_app(), raise_server_exceptions=False) as c:
        yield c


def detect(client: TestClient, params: dict[str, str], form: bool = False) -> tuple[int, dict[str, object]]:
    image = encode(blob_image(64, 64, [(10, 10, 20, 20, 0)]))
    if form:
        r = client.post("/v1/detect", files={"file": ("a.png", image, "image/png")}, data=params)
    else:
        r = client.post("/v1/detect", params=params, content=image, headers={"Content-Type": "image/png"})
    return r.status_code, r.json()


HOSTILE_OPTIONS: list[tuple[str, str, str]] = [
    # (option, value, a word the message must contain)
    ("classes", "\u00b2", "class"),  # a unicode digit: str.isdigit() is True, int() fails
    ("classes", HUGE_INT, "classes"),
    ("classes", ",".join(["red"] * 5000), "classes"),
    ("levels", "[" * 3000 + "]" * 3000, "levels"),
    ("levels", '[{"short_side": 1' + "0" * 400 + "}]", "levels"),
    ("levels", '[{"long_side": 1000000000000}]', "levels"),
    ("levels", '[{"short_side": 1048576}]', "chips"),  # allowed as a number; 10^10 chips, refused by arithmetic
    ("levels", '[{"long_side": 1316000}]', "long_side"),
    ("levels", '[{"scale": 1, "valid": [NaN, NaN]}]', "levels"),
    ("levels", '[{"scale": 1e400}]', "levels"),
    ("levels", '[{"scale": 1, "valid": [-1, Infinity]}]', "levels"),
    ("levels", json.dumps([{"scale": 1}] * 1000), "levels"),  # a URL carries ~64 KB at most; the form: any size
    ("levels", json.dumps([{"scale": 1}] * 17), "levels"),
    ("levels", "{}", "levels"),
    ("levels", "[1, 2]", "levels"),
    ("min_object_size", "inf", "min_object_size"),
    ("min_object_size", "nan", "min_object_size"),
    ("max_object_size", "1e400", "max_object_size"),
    ("score_threshold", "NaN", "score_threshold"),
    ("sigma", "1e400", "sigma"),
    ("max_detections", HUGE_INT, "max_detections"),
    ("max_detections", "\u00b2", "max_detections"),
    ("merge", "bogus", "merge"),
    ("preset", "p" * 10_000, "preset"),
    ("class_agnostic", "maybe", "class_agnostic"),
    ("timeout", "nan", "timeout"),
]


@pytest.mark.parametrize("form", [False, True], ids=["query", "form"])
@pytest.mark.parametrize(("name", "value", "word"), HOSTILE_OPTIONS, ids=lambda v: str(v)[:24])
def test_hostile_option_is_a_422_naming_it(client: TestClient, name: str, value: str, word: str, form: bool) -> None:
    if form and name == "timeout":
        pytest.skip("timeout is a query parameter only")
    status, body = detect(client, {name: value}, form=form)
    assert status == 422, body
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "invalid_options"
    assert word in error["message"], error["message"]
    assert len(error["message"]) < 1000  # never echoes a huge input
    assert client.get("/readyz").status_code == 200


def test_a_million_levels_in_a_form_field_is_refused_by_size(client: TestClient) -> None:
    status, body = detect(client, {"levels": json.dumps([{"scale": 1}] * 1_000_000)}, form=True)
    assert status in (413, 422), body
    assert "levels" in str(body) or "too_large" in str(body)


def test_a_normal_request_still_works(client: TestClient) -> None:
    status, body = detect(client, {"levels": '[{"scale": 1, "valid": [-1, null]}]', "classes": "red,1"})
    assert status == 200, body


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth('[{"a": "[[[[{{"}]') == 2
    assert json_depth('["\\"[["]') == 1
    assert json_depth("[" * 50 + "]" * 50) == 50


def test_levels_parser_refuses_before_recursing() -> None:
    from service.errors import InvalidOptions

    with pytest.raises(InvalidOptions, match="nested"):
        parse_levels("[" * 1000 + "]" * 1000)
    assert parse_levels('[{"scale": 2, "valid": [-1, 40]}]') == [{"scale": 2, "valid": [-1, 40]}]


def test_chip_count_is_computed_before_anything_is_allocated() -> None:
    """A level of 10^6 pixels a side on a small image would need ~10^8 chips (the old planner built that grid
    and needed 1.9 GB before refusing); the count is arithmetic now, so refusing costs no memory."""
    config = PlanConfig(chip_size=128, levels=(LevelSpec(long_side=1_000_000),), max_chips=4096)
    tracemalloc.start()
    try:
        with pytest.raises(PlanError, match="chips"):
            plan((640, 480), config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
