"""The request options are declared once (:class:`RequestOptions`): the server's parsing, the OpenAPI parameters,
the CLI flags and the client's keyword arguments all follow it."""

from __future__ import annotations

import argparse

import pytest

from snipserve_client import Client
from snipserve_client.client import option_params
from snipserve_client.options import OPTION_NAMES, RequestOptions


def test_openapi_parameters_are_the_declared_options() -> None:
    from service.http.app import create_app
    from service.settings import Settings

    operation = create_app(Settings(engine="fake", warmup=False)).openapi()["paths"]["/v1/detect"]["post"]
    names = [p["name"] for p in operation["parameters"]]
    assert set(OPTION_NAMES) <= set(names) and set(names) - set(OPTION_NAMES) == {"format", "timeout"}
    by_name = {p["name"]: p for p in operation["parameters"]}
    assert by_name["score_threshold"]["description"] == RequestOptions.model_fields["score_threshold"].description


def test_cli_flags_are_the_declared_options() -> None:
    from service.cli.io import add_option_arguments, option_strings

    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    flags = {a.dest.removeprefix("opt_") for a in parser._actions if a.dest.startswith("opt_")}
    assert flags == set(OPTION_NAMES)
    args = parser.parse_args(["--class-agnostic", "--no-edge-filter", "--score-threshold", "0.4", "--classes", "a,b"])
    assert option_strings(args) == {
        "class_agnostic": "true",
        "edge_filter": "false",
        "score_threshold": "0.4",
        "classes": "a,b",
    }


def test_detect_cli_takes_class_agnostic_and_edge_filter() -> None:
    from service.cli.detect import add_arguments
    from service.cli.io import option_strings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["img.png", "--class-agnostic", "--no-edge-filter"])
    assert option_strings(args) == {"class_agnostic": "true", "edge_filter": "false"}


def test_client_keyword_arguments_are_the_declared_options() -> None:
    assert option_params({"classes": ["car", 3], "class_agnostic": True, "timeout": 2}) == {
        "classes": "car,3",
        "class_agnostic": "true",
        "timeout": "2",
    }
    with pytest.raises(TypeError, match="score_treshold"):  # a typo the server would silently have ignored
        option_params({"score_treshold": 0.5})
    with Client("http://127.0.0.1:9") as client, pytest.raises(TypeError, match="unknown option"):
        client.detect(b"x", bogus=1)


def test_server_parses_exactly_the_declared_options() -> None:
    from service.engines.fake import FAKE_CARD
    from service.http.serving import detect_options, request_options

    raw = {"classes": "red", "class_agnostic": "true", "edge_filter": "false", "merge": "hard", "sigma": "0.7"}
    options = detect_options(request_options(raw), FAKE_CARD.classes)
    assert options.classes == (0,) and options.merge.class_agnostic and not options.edge_filter
    assert options.merge.method == "hard" and options.merge.sigma == 0.7
