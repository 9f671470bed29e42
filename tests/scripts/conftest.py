"""The GPU stand-in fixtures of tests/service, for the scripts that drive the GPU modules."""

from tests.service.conftest import fake_cupy  # noqa: F401 - a fixture, used by name
