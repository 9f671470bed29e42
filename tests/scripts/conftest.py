"""The GPU stand-in fixtures of tests/service, for the scripts that drive the GPU modules."""

from tests.service.conftest import fake_cupy, fake_trt  # noqa: F401 - fixtures, used by name
