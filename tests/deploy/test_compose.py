"""config/docker-compose.yml: the five services, and every host path it mounts exists.

Paths under run/ are the exception: they are created by the operator (the webhook token, the
model weights) and documented at the top of the file; run/ is the repo's runtime directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .conftest import REPO

COMPOSE = REPO / "config" / "docker-compose.yml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_services() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway", "app", "sidecar", "redis", "prometheus", "alertmanager",
                             "grafana"}
    for name in ("app", "sidecar"):
        dockerfile = services[name]["build"]["dockerfile"]
        assert (COMPOSE.parent / services[name]["build"]["context"] / dockerfile).is_file()


def test_every_mounted_host_path_exists() -> None:
    data = compose()
    named = set(data.get("volumes", {}))
    checked = 0
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            assert isinstance(volume, str), f"{name}: {volume!r}"
            source = volume.split(":", 1)[0]
            if source in named:
                continue
            assert source.startswith("."), f"{name}: undeclared named volume {source}"
            path = (COMPOSE.parent / source).resolve()
            if path.is_relative_to(REPO / "run"):
                continue
            assert path.exists(), f"{name}: {source} does not exist"
            checked += 1
    assert checked >= 8


def test_app_and_sidecar_share_logs_state_cache() -> None:
    services = compose()["services"]

    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}

    for target in ("/var/lib/tts/logs", "/var/lib/tts/state", "/var/lib/tts/cache"):
        assert mounts("app")[target] == mounts("sidecar")[target]


def test_grafana_gets_the_provisioned_dashboards() -> None:
    grafana = compose()["services"]["grafana"]["volumes"]
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/tts-sentinel.yaml")
                              .read_text())["providers"][0]["options"]["path"]
    dashboards = [v for v in grafana if v.startswith("../grafana/dashboards:")]
    assert dashboards
    assert dashboards[0].split(":")[1] == provider
    assert any(Path(v.split(":")[1]) == Path("/etc/grafana/provisioning/datasources")
               for v in grafana)


def test_sidecar_config_is_valid_and_reads_the_mounted_token() -> None:
    sidecar = compose()["services"]["sidecar"]["volumes"]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in sidecar}
    config_path = mounts["/etc/tts-sentinel/exporter.yaml"]
    result = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(config_path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    token_file = yaml.safe_load(config_path.read_text())["auth"]["bearer_token_file"]
    assert token_file in mounts
    alertmanager = compose()["services"]["alertmanager"]["volumes"]
    assert any(v.split(":")[1] == token_file for v in alertmanager)


def test_the_gateway_logs_where_the_sidecar_tails_it_as_the_gateway_format() -> None:
    """Issue 18 finding 1: nginx's access log on the shared log volume, a gateway source."""
    services = compose()["services"]
    gateway = {v.split(":")[1]: v.split(":")[0] for v in services["gateway"]["volumes"]}
    sidecar = {v.split(":")[1]: v.split(":")[0] for v in services["sidecar"]["volumes"]}
    conf = (COMPOSE.parent / gateway["/etc/nginx/conf.d/default.conf"]).read_text()
    log_path = Path(re.search(r"access_log (\S+) tts_gateway;", conf)[1])  # type: ignore[index]
    assert gateway[str(log_path.parent)] == sidecar["/var/lib/tts/logs"]
    exporter = yaml.safe_load((COMPOSE.parent / sidecar["/etc/tts-sentinel/exporter.yaml"])
                              .read_text())
    # the sidecar runs in /var/lib/tts (Dockerfile.exporter): relative paths start there
    sources = {str(Path("/var/lib/tts") / path): source["format"]
               for source in exporter["logs"]["sources"] for path in source["paths"]}
    assert sources["/var/lib/tts/logs/" + log_path.name] == "gateway"
    assert exporter["gate"]["mode"] == "auth_request"


def test_the_app_config_points_at_the_redis_service() -> None:
    services = compose()["services"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["app"]["volumes"]}
    config = yaml.safe_load((COMPOSE.parent / mounted["/etc/tts-sentinel/app.yaml"]).read_text())
    redis = services["redis"]["command"]
    address = f"{redis[redis.index('--bind') + 1]}:{redis[redis.index('--port') + 1]}"
    assert config["store"]["url"] == f"redis://{address}/0"
    assert redis[redis.index("--save") + 1] == ""      # nothing to persist: every key has a TTL
    assert redis[redis.index("--maxmemory-policy") + 1] == "volatile-lru"
    from tts_app.config import config_from_mapping
    config_from_mapping(config)  # raises when invalid
