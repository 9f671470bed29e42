"""Compatibility name for the Python client, which lives in its own package, :mod:`snipserve_client`
(importable without the server's dependencies). New code imports ``snipserve_client``."""

from snipserve_client import *  # noqa: F403
from snipserve_client import __all__ as __all__
