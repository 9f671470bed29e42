"""Settings are composed from the stage configs: one declaration per knob, so a bad value fails when the settings
are read (with the variable's name), never later when a stage is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from service.batch import BatcherConfig
from service.decode import DecodeConfig
from service.engines import EngineConfig
from service.http.transport import TransportConfig
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# setting -> (stage config, its field)
COMPOSED: dict[str, tuple[type[BaseModel], str]] = {
    "engine": (EngineConfig, "kind"),
    "intra_op_threads": (EngineConfig, "intra_op_threads"),
    "ort_spin": (EngineConfig, "spin"),
    "max_batch": (BatcherConfig, "max_batch"),
    "max_delay_ms": (BatcherConfig, "max_delay_ms"),
    "queue_capacity": (BatcherConfig, "queue_capacity"),
    "pipeline_depth": (BatcherConfig, "pipeline_depth"),
    "infer_timeout_s": (BatcherConfig, "infer_timeout_s"),
    "max_image_bytes": (DecodeConfig, "max_bytes"),
    "max_image_pixels": (DecodeConfig, "max_pixels"),
    "header_timeout_s": (TransportConfig, "header_timeout_s"),
    "min_body_rate": (TransportConfig, "min_body_rate"),
}


@pytest.mark.parametrize("setting", sorted(COMPOSED))
def test_setting_has_the_stage_configs_bounds(setting: str) -> None:
    config, field = COMPOSED[setting]
    assert Settings.model_fields[setting].metadata == config.model_fields[field].metadata
    assert Settings.model_fields[setting].annotation == config.model_fields[field].annotation


def test_bad_max_delay_fails_at_settings_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to pass the settings (ge=0 only) and fail when the batcher was built, at startup."""
    monkeypatch.setenv("SNIPSERVE_MAX_DELAY_MS", "20000")
    with pytest.raises(ValidationError, match="max_delay_ms"):
        Settings()


def test_stage_configs_come_out_of_the_settings() -> None:
    s = Settings(max_delay_ms=7, queue_capacity=9, max_image_bytes=4096, header_timeout_s=3, engine="fake")
    assert s.batcher_config().max_delay_ms == 7 and s.batcher_config().queue_capacity == 9
    assert s.decode_config().max_bytes == 4096 and s.engine_config().kind == "fake"
    assert s.transport_config().header_timeout_s == 3
    assert s.transport_config().max_body_bytes == 4096 + 1024 * 1024


def test_readme_settings_table_is_generated_from_the_code() -> None:
    table = subprocess.run(
        [sys.executable, "scripts/settings_table.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert table.strip() in (ROOT / "README.md").read_text(), "rerun scripts/settings_table.py into the README"
