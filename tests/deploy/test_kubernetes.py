"""config/kubernetes/: schema-valid manifests, generated copies in step with their sources, and
the pod wiring that makes the VRAM gate take a replica out of the Service.

Core kinds are validated offline with kubernetes-validate's bundled schemas (strict: unknown
fields fail). The Prometheus Operator CRDs (PodMonitor, PrometheusRule) have no schema there,
so their structure is checked here and the embedded rules go through ``promtool check rules``.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import pytest
import yaml

from config.kubernetes import gen_manifests

from .conftest import REPO

K8S = REPO / "config" / "kubernetes"

CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"),
             ("monitoring.coreos.com/v1", "PrometheusRule")}


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for _, d in documents()
               if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def container(name: str) -> dict[str, Any]:
    spec = find("Deployment", "tts")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def embedded(configmap: str, key: str) -> dict[str, Any]:
    return yaml.safe_load(find("ConfigMap", configmap)["data"][key])


def test_core_manifests_pass_strict_schema_validation() -> None:
    checked = 0
    for _filename, doc in documents():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        kv.validate(doc, kv.latest_version(), strict=True)
        checked += 1
    assert checked >= 9  # 2 Deployments, 2 Services, PDB, HPA, 2 config ConfigMaps, adapter


def test_validator_rejects_a_broken_deployment() -> None:
    broken = copy.deepcopy(find("Deployment", "tts"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_generated_manifests_are_up_to_date() -> None:
    for filename, render in gen_manifests.GENERATED.items():
        assert (K8S / filename).read_text() == render(), f"run gen_manifests.py ({filename})"
    rules = yaml.safe_load((REPO / "alerts" / "tts.rules.yaml").read_text())
    assert find("PrometheusRule")["spec"]["groups"] == rules["groups"]


def test_crd_structure() -> None:
    rule = find("PrometheusRule")
    assert rule["metadata"]["name"]
    assert rule["spec"]["groups"]
    for group in rule["spec"]["groups"]:
        assert group["name"]
        assert group["rules"]
        for item in group["rules"]:
            assert ("record" in item) != ("alert" in item)
            assert item["expr"]
    monitor = find("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        find("Deployment", "tts")["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"] for p in container("sidecar")["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    # The rules match job="tts-exporter": the PodMonitor's jobLabel must produce that value.
    labels = find("Deployment", "tts")["spec"]["template"]["metadata"]["labels"]
    assert labels[monitor["spec"]["jobLabel"]] == "tts-exporter"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_prometheusrule_passes_promtool(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": find("PrometheusRule")["spec"]["groups"]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_configmaps_are_derived_from_the_shipped_configs(tmp_path: Path) -> None:
    for name, key, overrides in (("tts-app-config", "app.yaml", gen_manifests.APP_OVERRIDES),
                                 ("tts-exporter-config", "exporter.yaml",
                                  gen_manifests.EXPORTER_OVERRIDES)):
        base = yaml.safe_load((REPO / "config" / key).read_text())
        assert embedded(name, key) == gen_manifests.deep_merge(base, overrides)
    path = tmp_path / "exporter.yaml"
    path.write_text(find("ConfigMap", "tts-exporter-config")["data"]["exporter.yaml"])
    result = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    from tts_app.config import config_from_mapping
    config_from_mapping(embedded("tts-app-config", "app.yaml"))  # raises when invalid


def test_readiness_follows_the_sidecar_gate() -> None:
    exporter = embedded("tts-exporter-config", "exporter.yaml")
    probe = container("app")["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ingress"
    assert probe["port"] == int(exporter["server"]["listen"].rsplit(":", 1)[1])
    assert exporter["gate"]["mode"] == "readiness"  # closed -> 503 -> pod not ready
    # the pod's gate closes where the PrometheusRule's close_ingress alert fires
    alert = next(rule for group in find("PrometheusRule")["spec"]["groups"]
                 for rule in group["rules"] if rule.get("alert") == "TTSGpuMemoryHigh")
    assert float(alert["expr"].rsplit(">=", 1)[1]) == exporter["gate"]["close_at"], alert["expr"]


def test_pod_shares_logs_cache_and_gate_file() -> None:
    app, exporter = embedded("tts-app-config", "app.yaml"), \
        embedded("tts-exporter-config", "exporter.yaml")
    assert app["gate"]["file"] == exporter["gate"]["gate_file"]
    assert Path(app["log"]["path"]).match(exporter["logs"]["paths"][0])
    assert exporter["disk"]["paths"] == [app["cache"]["dir"]]
    spec = find("Deployment", "tts")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
              for c in spec["containers"]}
    for path in (app["gate"]["file"], app["log"]["path"], app["cache"]["dir"] + "/x"):
        shared = [next((n for mp, n in mounts[c].items() if path.startswith(mp + "/")), None)
                  for c in ("app", "sidecar")]
        assert shared[0] is not None, path
        assert shared[0] == shared[1], path
        assert "emptyDir" in volumes[shared[0]]
    # The webhook token comes from a Secret, mounted where the exporter config looks.
    token = exporter["auth"]["bearer_token_file"]
    secret_mount = next(mp for mp, n in mounts["sidecar"].items() if "secret" in volumes[n])
    assert token.startswith(secret_mount + "/")


def test_gpu_resources_and_tolerations() -> None:
    spec = find("Deployment", "tts")["spec"]["template"]["spec"]
    assert container("app")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    env = {e["name"]: e["value"] for e in container("sidecar")["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]
    assert "nvidia.com/gpu" not in \
        container("sidecar")["resources"].get("limits", {})
    assert find("PodDisruptionBudget")["spec"]["selector"] == \
        find("Deployment", "tts")["spec"]["selector"]


def test_hpa_scales_on_the_adapter_metrics() -> None:
    adapter = embedded("prometheus-adapter", "config.yaml")
    exposed = {rule["name"]["as"] for rule in adapter["rules"]}
    hpa = find("HorizontalPodAutoscaler")
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"]["averageValue"]
               for m in hpa["spec"]["metrics"]}
    assert set(targets) <= exposed
    assert targets["tts_http_request_p99_seconds"] == "800m"  # 0.8 s
    assert hpa["spec"]["scaleTargetRef"]["name"] == find("Deployment", "tts")["metadata"]["name"]


def test_sidecar_beyond_loopback_serves_tls_and_basic_auth() -> None:
    """The pod IP is reachable cluster-wide: the sidecar runs with the web config, the probes
    speak HTTPS to its open routes, and the PodMonitor scrapes with TLS and basic auth."""
    args = container("sidecar")["args"]
    web_config = Path(args[args.index("--web.config.file") + 1])
    mounts = {m["mountPath"]: m["name"] for m in container("sidecar")["volumeMounts"]}
    volumes = {v["name"]: v for v in find("Deployment", "tts")["spec"]["template"]["spec"]
               ["volumes"]}
    # the web config, and the certificate and key it names, are files of the mounted Secret
    web = yaml.safe_load((REPO / "config" / "exporter-web.yml").read_text())["tls_server_config"]
    for path in (web_config, Path(web["cert_file"]), Path(web["key_file"])):
        secret = volumes[mounts[str(path.parent)]]["secret"]
        assert path.name in {item["path"] for item in secret["items"]}, path
    assert container("app")["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container("sidecar")["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    endpoint = find("PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["ca"]["secret"]
    assert endpoint["basicAuth"]["username"]
    assert endpoint["basicAuth"]["password"]
    exporter = embedded("tts-exporter-config", "exporter.yaml")
    assert {"/ingress", "/healthz"} == set(exporter["server"]["unauthenticated_paths"])


def with_nginx() -> dict[str, Any]:
    """The Deployment with nginx/deployment-patch.yaml applied as kubectl's strategic merge
    does for it (containers and volumes merge by name)."""
    deployment = copy.deepcopy(find("Deployment", "tts"))
    patch = yaml.safe_load((K8S / "nginx" / "deployment-patch.yaml").read_text())
    spec, extra = deployment["spec"]["template"]["spec"], patch["spec"]["template"]["spec"]
    for key in ("containers", "volumes"):
        names = {item["name"] for item in spec[key]}
        assert not names & {item["name"] for item in extra[key]}
        spec[key] += extra[key]
    return deployment


def test_the_optional_nginx_container_logs_where_the_sidecar_reads_the_gateway() -> None:
    """Issue 18 finding 1: nginx in the pod, its access log on the logs emptyDir."""
    deployment = with_nginx()
    kv.validate(deployment, kv.latest_version(), strict=True)
    spec = deployment["spec"]["template"]["spec"]
    nginx = next(c for c in spec["containers"] if c["name"] == "nginx")
    nginx_mounts = {m["mountPath"]: m["name"] for m in nginx["volumeMounts"]}
    config_volume = next(v for v in spec["volumes"]
                         if v["name"] == nginx_mounts["/etc/nginx/conf.d"])
    config_map = yaml.safe_load((K8S / "nginx" / "configmap.yaml").read_text())
    kv.validate(config_map, kv.latest_version(), strict=True)
    assert config_map["metadata"]["name"] == config_volume["configMap"]["name"]
    conf = config_map["data"]["default.conf"]
    assert not re.search(r"^\s*auth_request ", conf, re.M)
    assert "proxy_set_header X-Request-ID $request_id;" in conf
    log_path = Path(re.search(r"access_log (\S+) tts_gateway;", conf)[1])  # type: ignore[index]
    sidecar_mounts = {m["name"]: m["mountPath"] for m in container("sidecar")["volumeMounts"]}
    volume = nginx_mounts[str(log_path.parent)]
    seen_by_sidecar = Path(sidecar_mounts[volume]) / log_path.name
    exporter = embedded("tts-exporter-config", "exporter.yaml")
    assert {"paths": [str(seen_by_sidecar)], "format": "gateway"} in exporter["logs"]["sources"]
    ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    assert re.findall(r"^\s*listen (\d+);", conf, re.M) == [str(ports["gateway"])]
def test_the_replicas_share_the_redis_service() -> None:
    url = embedded("tts-app-config", "app.yaml")["store"]["url"]
    service = find("Service", "tts-redis")
    assert url == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    redis = find("Deployment", "tts-redis")
    assert service["spec"]["selector"].items() <= \
        redis["spec"]["template"]["metadata"]["labels"].items()
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--save") + 1] == ""      # nothing to persist: every key has a TTL
    assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
