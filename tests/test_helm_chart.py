"""The Helm chart under deploy/helm/avatar-stack, rendered with `helm template` and validated with
`kubeconform` against Kubernetes' own JSON schemas, offline.

`make setup-deploy-tools` builds the pinned helm and kubeconform into `.cache/gobin/` (Go module
proxy); the schemas come from the `kubernetes-validate` wheel (test extra). Without the tools the
test skips, except under CI=true, where that fails. KEDA's ScaledObject has no schema there (a CRD):
kubeconform skips it (`-ignore-missing-schemas`) and the test checks its fields itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.worker import SHUTDOWN_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "avatar-stack"
K8S_VERSION = "1.33.0"


def _tool(name: str) -> str:
    found = os.environ.get(f"{name.upper()}_BIN") or shutil.which(name)
    local = ROOT / ".cache" / "gobin" / name
    if not found and local.exists():
        found = str(local)
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI needs {name}: `make setup-deploy-tools` installs it into .cache/gobin/")
    pytest.skip(f"needs {name}: run `make setup-deploy-tools` (go install, pinned)")


def _schemas() -> Path:
    """Kubernetes' JSON schemas of K8S_VERSION (the kubernetes-validate wheel, or KUBE_SCHEMA_DIR)."""
    if os.environ.get("KUBE_SCHEMA_DIR"):
        root = Path(os.environ["KUBE_SCHEMA_DIR"])
    else:
        spec = importlib.util.find_spec("kubernetes_validate")
        if spec is None or not spec.origin:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail("CI needs the kubernetes-validate wheel (test extra) for the schemas")
            pytest.skip("needs the kubernetes-validate wheel (pip install -e '.[test]')")
        root = Path(spec.origin).parent / "kubernetes-json-schema"
    folder = root / f"v{K8S_VERSION}-local-strict"
    assert folder.is_dir(), f"no schemas for Kubernetes {K8S_VERSION} in {root}"
    return folder


def render(*sets: str) -> list[dict]:
    args = [_tool("helm"), "template", "t", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _standalone(docs: list[dict], local: Path, out: Path) -> None:
    """The schemas of the kinds in `docs`, made standalone for kubeconform: the wheel's refer to one
    shared `/api/_definitions.json`; here each file carries those definitions itself."""
    defs = json.loads((local / "_definitions.json").read_text())["$defs"]
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
        name = f"{doc['kind'].lower()}{suffix}.json"
        if not (local / name).exists() or (out / name).exists():
            continue
        schema = json.loads((local / name).read_text().replace('"/api/_definitions.json#', '"#'))
        schema["$defs"] = defs
        (out / name).write_text(json.dumps(schema))


VARIANTS = {
    "defaults": (),
    "cluster": ("redis.clusterUrl=redis://redis-cluster:6379", "redis.addresses=rc-0:6379\\,rc-1:6379"),
    "single-node, own secret, no KEDA": (
        "redis.url=redis://redis:6379/0", "secrets.existingSecret=avatar-keys", "keda.enabled=false",
        "gateway.hpa.enabled=false",
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_chart_renders_and_validates_against_the_kubernetes_schemas(variant: str, tmp_path: Path) -> None:
    docs = render(*VARIANTS[variant])
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(yaml.safe_dump_all(docs))
    _standalone(docs, _schemas(), tmp_path)
    result = subprocess.run(
        [_tool("kubeconform"), "-strict", "-summary", "-output", "json", "-kubernetes-version", K8S_VERSION,
         "-ignore-missing-schemas", "-schema-location", str(tmp_path / "{{ .ResourceKind }}{{ .KindSuffix }}.json"),
         str(manifests)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert report["summary"]["invalid"] == 0 and report["summary"]["errors"] == 0
    assert report["summary"]["valid"] == len(docs) - len(scaled), report  # every core object validated
    assert report["summary"]["skipped"] == len(scaled)  # only KEDA's CRD goes unvalidated by schema (checked below)


def _by(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_what_the_chart_promises() -> None:
    docs = render("redis.clusterUrl=redis://redis-cluster:6379", "secrets.existingSecret=avatar-keys")
    deployments, services = _by(docs, "Deployment"), _by(docs, "Service")
    assert set(deployments) == {"t-gateway", "t-stt", "t-avatar"}

    # /metrics is not on the public port: the only Service exposes the gateway's http port, and the
    # gateway serves its metrics on a port of its own.
    [service] = services.values()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    gateway = deployments["t-gateway"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in gateway["containers"][0]["env"]}
    ports = {p["name"]: p["containerPort"] for p in gateway["containers"][0]["ports"]}
    assert env["GATEWAY_METRICS_PORT"] == str(ports["metrics"]) and ports["metrics"] != ports["http"]
    assert gateway["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"

    for name in ("t-stt", "t-avatar"):
        pod = deployments[name]["spec"]["template"]["spec"]
        [c] = pod["containers"]
        # Graceful SIGTERM: the hand-back (at most SHUTDOWN_TIMEOUT_S) fits in the grace period.
        assert pod["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT_S
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert [p["name"] for p in c["ports"]] == ["metrics"]  # nothing public on a worker
        # Secrets come from the Secret, never from the ConfigMap
        assert {"secretRef": {"name": "avatar-keys"}} in c["envFrom"]
    config = next(iter(_by(docs, "ConfigMap").values()))["data"]
    assert not [k for k in config if re.search(r"KEY|SECRET|PASSWORD|TOKEN", k)]
    assert config["REDIS_CLUSTER_URL"] == "redis://redis-cluster:6379"

    assert set(_by(docs, "PodDisruptionBudget")) == {"t-gateway", "t-stt", "t-avatar"}
    [hpa] = _by(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "t-gateway"

    # Workers scale on their backlog: one entry per live session in jobs:{kind}.
    scaled = _by(docs, "ScaledObject")
    assert set(scaled) == {"t-stt", "t-avatar"}
    for kind in ("stt", "avatar"):
        obj = scaled[f"t-{kind}"]
        assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["spec"]["scaleTargetRef"]["name"] == f"t-{kind}"
        [trigger] = obj["spec"]["triggers"]
        assert trigger["type"] == "redis-cluster-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == f"jobs:{kind}" and meta["consumerGroup"] == kind and int(meta["streamLength"]) > 0
        assert meta["addresses"]


def test_the_chart_makes_a_secret_only_when_asked() -> None:
    assert not _by(render(), "Secret")
    made = _by(render("secrets.create=true", "secrets.values.DEEPGRAM_API_KEY=dg"), "Secret")
    assert next(iter(made.values()))["stringData"] == {"DEEPGRAM_API_KEY": "dg"}
