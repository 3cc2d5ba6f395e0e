"""The ops kit under deploy/: the Prometheus scrape config finds every service, and the Grafana
dashboard plots only series the services really export (so a renamed metric cannot leave a blank
panel); every process exports `avatar_stack_build_info`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "count", "le", "irate", "increase", "avg", "max", "min"}


def exported_series() -> set[str]:
    """Every sample name the three services can export (their modules register the metrics)."""
    import avatar_service.worker  # noqa: F401
    import common.build_info
    import common.metrics
    import common.pipelining  # noqa: F401
    import gateway.app  # noqa: F401
    import stt_service.audio_feed
    import stt_service.worker  # noqa: F401

    names: set[str] = set()
    from common.exposition import EXPOSED

    for family in EXPOSED.collect():
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        else:
            names.add(base)
    return names


def test_dashboard_uses_only_exported_series():
    dash = json.loads((DEPLOY / "grafana" / "avatar-stack.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    exported = exported_series()
    for expr in exprs:
        # Names outside label matchers, `by (...)` lists and legends: the metric names in the query.
        stripped = re.sub(r"by \([^)]*\)|\{[^}]*\}|\[[^\]]*\]", " ", expr)
        names = {w for w in re.findall(r"[a-z_][a-z0-9_]*", stripped) if w not in PROMQL_WORDS}
        assert names, expr
        assert names <= exported, (expr, names - exported)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dash["panels"])


def test_prometheus_scrapes_every_service_on_its_metrics_port():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    defaults = Settings()
    expected = {"gateway": 8000, "stt": defaults.stt_metrics_port, "avatar": defaults.avatar_metrics_port}
    for service, port in expected.items():
        job = jobs[f"avatar-stack-{service}"]
        [sd] = job["dns_sd_configs"]
        assert sd["names"] == [service] and sd["port"] == port
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(expected) <= set(compose["services"])  # the names Prometheus resolves
    grafana = compose["services"]["grafana"]
    assert any("avatar-stack.json" in v for v in grafana["volumes"])
    assert compose["services"]["prometheus"]["profiles"] == ["monitoring"]


def test_every_series_of_ours_has_the_prefix():
    exported = exported_series()
    ours = {n for n in exported if not n.startswith(("python_", "process_"))}
    assert ours and all(n.startswith("avatar_stack_") for n in ours), sorted(ours)
    assert "avatar_stack_gateway_audio_frames_total" in exported


def test_build_info_is_exported():
    from common.build_info import package_version, set_build_info

    set_build_info("gateway")
    from common.exposition import EXPOSED

    text = generate_latest(EXPOSED).decode()
    version = re.escape(package_version())
    assert re.search(rf'avatar_stack_build_info\{{[^}}]*service="gateway"[^}}]*version="{version}"', text), text
