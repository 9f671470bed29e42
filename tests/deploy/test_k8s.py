"""deploy/k8s: every overlay renders with ``kubectl kustomize``, validates against the Kubernetes schemas
(kubernetes-validate, strict) and the vendored KEDA / Prometheus Operator CRD schemas, and names what the code
has: settings (``SNIPSERVE_*`` = ``Settings`` fields), routes and ports of the probes, metrics in the autoscaler
queries and rules, the exporter's flags in the init container. Renaming any of them fails a test here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, RULES
from tests.deploy.test_dashboard_and_rules import METRIC, SELECTOR, names  # noqa: F401 - `names` is a fixture

K8S = DEPLOY / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
OVERLAYS = ("cpu", "gpu", "gpu-hpa")
K8S_VERSION = "1.30"  # oldest Kubernetes minor the manifests are written for (native sidecars not used)
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules_v1.json",
}
# Labels the Prometheus Operator puts on every series it scrapes through a ServiceMonitor.
OPERATOR_TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH: cannot render the kustomize overlays")


def kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@cache
def _render(overlay: str) -> str:
    return json.dumps(kustomize(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects (a fresh copy per call; rendering runs once per overlay)."""
    objects: list[dict[str, Any]] = json.loads(_render(overlay))
    return objects


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == "snipserve")
    return container


def settings_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The SNIPSERVE_* settings the server container gets from its ConfigMap."""
    container = server(objects)
    (ref,) = [e["configMapRef"]["name"] for e in container["envFrom"]]
    data: dict[str, str] = one(objects, "ConfigMap", ref)["data"]
    return data


# ---- rendering and schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    kinds = sorted(o["kind"] for o in rendered(overlay))
    autoscaler = "HorizontalPodAutoscaler" if overlay == "gpu-hpa" else "ScaledObject"
    expected = ["ConfigMap", "Deployment", "PodDisruptionBudget", "PrometheusRule", "Service", "ServiceMonitor"]
    assert set(kinds) == set(expected) | {autoscaler} | ({"PersistentVolumeClaim"} if overlay != "cpu" else set())
    assert kinds.count(autoscaler) == 1  # the hpa overlay replaces the ScaledObject, it does not add to it
    for obj in rendered(overlay):
        assert obj["metadata"].get("namespace") == "snipserve", (obj["kind"], obj["metadata"]["name"])


def with_components(tmp_path: Path, overlay: str, *components: str) -> list[dict[str, Any]]:
    """An overlay plus optional components, as a user's own kustomization would combine them."""
    root = tmp_path / "k"
    root.mkdir()
    body = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "snipserve",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, root)],  # kustomize takes relative paths only
        "components": [os.path.relpath(K8S / "components" / c, root) for c in components],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(body))
    return kustomize(root)


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each overlay, and the gpu and cpu overlays with the optional ingress and models-volume components."""
    out = {overlay: rendered(overlay) for overlay in OVERLAYS}
    for overlay in ("cpu", "gpu"):
        out[f"{overlay}+ingress+models"] = with_components(
            tmp_path_factory.mktemp(overlay), overlay, "ingress", "models-pvc"
        )
    return out


def core_errors(obj: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
    return None


@cache
def crd_schema(file: str) -> str:
    return json.dumps(strict_schema(json.loads((SCHEMAS / file).read_text())))


def strict_schema(node: Any) -> Any:
    """Like the API server's strict field validation: no unknown fields where the CRD lists the properties."""
    if isinstance(node, dict):
        node = {k: strict_schema(v) for k, v in node.items()}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    return node


def custom_errors(obj: dict[str, Any]) -> list[str]:
    file = CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])]
    validator = jsonschema.Draft7Validator(json.loads(crd_schema(file)))
    return [f"{obj['kind']}: {e.message} at {list(e.absolute_path)}" for e in validator.iter_errors(obj)]


def test_every_rendered_object_passes_its_schema(everything: dict[str, list[dict[str, Any]]]) -> None:
    checked: set[str] = set()
    for variant, objects in everything.items():
        for obj in objects:
            key = (obj["apiVersion"], obj["kind"])
            if key in CRD_SCHEMAS:
                assert not custom_errors(obj), (variant, custom_errors(obj))
            else:
                assert core_errors(obj) is None, (variant, core_errors(obj))
            checked.add(obj["kind"])
    assert {"Ingress", "HorizontalPodAutoscaler", "ScaledObject", "ServiceMonitor", "PrometheusRule"} <= checked


def test_the_schemas_catch_mistakes() -> None:
    objects = rendered("gpu")
    deployment = copy.deepcopy(one(objects, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    assert core_errors(deployment) is not None
    deployment = copy.deepcopy(one(objects, "Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "75s"
    assert core_errors(deployment) is not None
    scaled = copy.deepcopy(one(objects, "ScaledObject"))
    scaled["spec"]["triggers"][0]["metricTyp"] = "AverageValue"
    assert custom_errors(scaled)
    scaled = copy.deepcopy(one(objects, "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "one"
    assert custom_errors(scaled)
    monitor = copy.deepcopy(one(objects, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert custom_errors(monitor)
    rule = copy.deepcopy(one(objects, "PrometheusRule"))
    del rule["spec"]["groups"][0]["name"]
    assert custom_errors(rule)


def test_vendored_schemas_say_where_they_come_from() -> None:
    for file in CRD_SCHEMAS.values():
        comment = json.loads((SCHEMAS / file).read_text())["$comment"]
        assert re.search(r"github\.com/\S+ \S+ at commit [0-9a-f]{40} \(Apache-2\.0\)", comment), comment


# ---- names checked against the code --------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_settings_with_valid_values(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    objects = rendered(overlay)
    container = server(objects)
    env = settings_env(objects)
    prefix = Settings.model_config["env_prefix"]
    named = set(env) | {e["name"] for e in container.get("env", [])}
    for init in one(objects, "Deployment")["spec"]["template"]["spec"].get("initContainers", []):
        named |= {e["name"] for e in init.get("env", [])}
    ours = {n for n in named if n.startswith(prefix)}
    assert ours, "no SNIPSERVE_ settings"
    unknown = {n for n in ours if n[len(prefix) :].lower() not in Settings.model_fields}
    assert not unknown, f"{sorted(unknown)} are not fields of service.settings.Settings"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # the ConfigMap's values parse and pass the fields' constraints
    assert {k[len(prefix) :].lower() for k in env} <= settings.model_fields_set  # each one read, none ignored
    secret = next(e for e in container["env"] if e["name"] == f"{prefix}API_KEY")
    assert secret["valueFrom"]["secretKeyRef"]["name"] == "snipserve-api-key"


@pytest.fixture(scope="module")
def app_routes() -> set[str]:
    """GET paths the running app (fake engine) answers 200 once ready: the probes must name some of these."""
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.settings import Settings

    candidates = ("/healthz", "/readyz", "/metrics", "/livez", "/health", "/ready")
    with TestClient(create_app(Settings(engine="fake", warmup=False))) as client:
        return {path for path in candidates if client.get(path).status_code == 200}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_selectors_match_the_service(overlay: str, app_routes: set[str]) -> None:
    objects = rendered(overlay)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    container = server(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(settings_env(objects)["SNIPSERVE_PORT"])}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 while warming up or draining
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in app_routes and get["port"] in ports, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # model load + warm-up
    service = one(objects, "Service")
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    labels = pod["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] in app_routes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay: str) -> None:
    objects = rendered(overlay)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    shutdown = float(settings_env(objects)["SNIPSERVE_SHUTDOWN_TIMEOUT_S"])
    # service/cli/serve.py: drain (shutdown_timeout_s), then uvicorn closes connections (same timeout), then SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 2 * shutdown + 5
    assert pre_stop < container["readinessProbe"]["periodSeconds"] * 2  # not longer than it takes to be removed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_on_a_read_only_root(overlay: str) -> None:
    pod = one(rendered(overlay), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], container["name"]  # uploads spool to /tmp


def test_cpu_overlay_sizes_threads_to_its_cores() -> None:
    objects = rendered("cpu")
    resources = server(objects)["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS: no CFS throttling of inference
    assert int(settings_env(objects)["SNIPSERVE_INTRA_OP_THREADS"]) == int(resources["limits"]["cpu"])
    assert "nvidia.com/gpu" not in resources["limits"]


def export_parser() -> Any:
    import argparse

    from exporters.cli import add_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser


@pytest.mark.parametrize("overlay", ["gpu", "gpu-hpa"])
def test_gpu_overlay_builds_the_engine_the_server_loads(overlay: str) -> None:
    objects = rendered(overlay)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server(objects)
    env = settings_env(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    (init,) = pod["initContainers"]
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1
    script_cm = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    script = one(objects, "ConfigMap", script_cm)["data"]["build-engine.sh"]
    assert init["command"] == ["sh", "/scripts/build-engine.sh"]
    assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0
    (line,) = [ln.strip() for ln in script.splitlines() if ln.strip().startswith("snipserve export tensorrt")]
    argv = [re.sub(r"\$\{?\w+\}?", "x", a) for a in shlex.split(line)[2:]]
    args = export_parser().parse_args(argv)  # unknown or renamed flags raise here
    assert args.format == "tensorrt" and args.max_batch == int(env["SNIPSERVE_MAX_BATCH"])
    engine_file = Path(env["SNIPSERVE_MODEL_PATH"])
    assert engine_file.parent == Path(env["SNIPSERVE_MODELS_DIR"]) and env["SNIPSERVE_ENGINE"] == "tensorrt"
    assert f"/{engine_file.name}" in script and f'cp "$dir/{engine_file.name}"' in script
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    server_mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert init_mounts[str(engine_file.parent)] == server_mounts[str(engine_file.parent)]
    cache_volume = next(v for v in pod["volumes"] if v["name"] == init_mounts["/engine-cache"])
    claim = one(objects, "PersistentVolumeClaim", cache_volume["persistentVolumeClaim"]["claimName"])
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def nginx_size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def test_ingress_allows_the_largest_image_and_long_streams(tmp_path: Path) -> None:
    objects = with_components(tmp_path, "gpu", "ingress")
    notes = one(objects, "Ingress")["metadata"]["annotations"]
    limit = int(settings_env(objects)["SNIPSERVE_MAX_IMAGE_BYTES"])
    body = nginx_size(notes["nginx.ingress.kubernetes.io/proxy-body-size"])
    # at least the image plus multipart framing (the server allows 64 KiB), at most the WebSocket frame limit
    assert limit + 64 * 1024 <= body <= limit + 1024 * 1024
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) >= 600
    backend = one(objects, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = one(objects, "Service")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


# ---- autoscaling and alerts against the metrics ---------------------------------------------------


def check_promql(expr: str, names: dict[str, set[str]]) -> set[str]:  # noqa: F811 - names is the fixture's value
    used = set(METRIC.findall(expr))
    assert used, f"no metric in {expr!r}"
    assert used <= set(names), f"{sorted(used - set(names))} are not exposed by service/metrics.py"
    for metric, matchers in SELECTOR.findall(expr):
        labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
        assert labels <= names[metric] | OPERATOR_TARGET_LABELS, (metric, labels)
    return used


def assert_target_between_batch_and_capacity(target: int, env: dict[str, str]) -> None:
    """Queued chips per replica to scale at: at least one batch; at most 1/8 of the queue. A replica's queue (the
    metric) stops growing at its capacity, so one scaling step can ask for at most capacity / target replicas:
    below 8, a 10x burst takes several steps of pod start-up to be met (README, simulation)."""
    assert int(env["SNIPSERVE_MAX_BATCH"]) <= target <= int(env["SNIPSERVE_QUEUE_CAPACITY"]) // 8


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_scaled_object_scales_the_deployment_on_queued_chips(overlay: str, names: dict[str, set[str]]) -> None:  # noqa: F811
    objects = rendered(overlay)
    scaled = one(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert check_promql(query, names) == {"snipserve_queue_depth_chips"}
    selectors = dict(re.findall(r'(\w+)="([^"]*)"', query))
    assert selectors["namespace"] == scaled["metadata"]["namespace"]
    assert selectors["job"] == one(objects, "Service")["metadata"]["name"]  # the Operator's job label
    assert_target_between_batch_and_capacity(int(trigger["metadata"]["threshold"]), settings_env(objects))
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 60


def test_hpa_alternative_uses_the_adapter_metric(names: dict[str, set[str]]) -> None:  # noqa: F811
    objects = rendered("gpu-hpa")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "components/hpa-prometheus-adapter/prometheus-adapter-rules.yaml").read_text())
    (rule,) = adapter["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert check_promql(rule["seriesQuery"], names) == {metric["pods"]["metric"]["name"]}
    assert_target_between_batch_and_capacity(int(metric["pods"]["target"]["averageValue"]), settings_env(objects))
    behaviour = one(rendered("gpu"), "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa["spec"]["behavior"] == behaviour["behavior"]  # the same control law either way


def test_prometheus_rule_is_the_compose_rules_file(names: dict[str, set[str]]) -> None:  # noqa: F811
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "k8s_prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for overlay in OVERLAYS:
        rule = one(rendered(overlay), "PrometheusRule")
        assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                check_promql(r["expr"], names)
