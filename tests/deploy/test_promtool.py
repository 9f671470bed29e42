"""The real ``promtool`` on the live exposition, the alert rules, their unit tests and the config."""

from __future__ import annotations

import subprocess

from tests.deploy.conftest import PROMETHEUS_CONFIG, ROOT, RULE_TESTS, RULES


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def test_check_metrics_on_live_exposition(promtool: str, exposition: str) -> None:
    # Lints names, units, HELP text and counter suffixes; any finding is printed and fails the check.
    done = run(promtool, "check", "metrics", stdin=exposition)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_check_rules(promtool: str) -> None:
    done = run(promtool, "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_rule_unit_tests(promtool: str) -> None:
    done = run(promtool, "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_check_config(promtool: str) -> None:
    # Also resolves and checks rule_files relative to the config, as the compose stack mounts them.
    done = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_check_metrics_on_gpu_families(promtool: str) -> None:
    # This machine has no GPU: lint the GPU gauges as a 2-GPU host would expose them (stub NVML).
    from prometheus_client import CollectorRegistry, generate_latest

    from service.metrics import GpuCollector
    from tests.service.test_metrics import FakeNvml

    registry = CollectorRegistry()
    registry.register(GpuCollector(nvml_loader=FakeNvml))
    text = generate_latest(registry).decode()
    assert 'snipserve_gpu_memory_used_bytes{gpu="1"}' in text
    done = run(promtool, "check", "metrics", stdin=text)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
