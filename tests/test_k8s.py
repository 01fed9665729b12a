"""deploy/k8s: every manifest validates against the Kubernetes schemas (strict: unknown fields
fail), the CRD and kustomization against schemas carried in tests/schemas, and the pieces fit
together: references resolve, labels select, and the configs load with the project's own
loaders in the environment the pods give them."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from babel_sync.service.config import ServiceConfig
from objstore.config import Config
from pcache.config import WorkerConfig
from pcache.membership import parse_dns_target

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy/k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERNETES_VERSION = "1.33.0"  # the oldest release the manifests target (native sidecars GA)
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization-v1beta1.json",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def validate(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` does not validate (jsonschema or kubernetes_validate errors)."""
    schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is not None:
        jsonschema.validate(doc, json.loads((SCHEMAS / schema).read_text()))
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize(
    ("where", "break_it"),
    [
        ("pcache-daemonset.yaml", lambda d: d["spec"]["template"]["spec"].update(hostNetwrk=True)),
        (
            "pcache-daemonset.yaml",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(
                containerPort="7070"
            ),
        ),
        ("servicemonitors.yaml", lambda d: d["spec"]["endpoints"][0].update(intervall="30s")),
        ("servicemonitors.yaml", lambda d: d["spec"]["endpoints"][0].update(interval="30 s")),
        ("kustomization.yaml", lambda d: d.update(resource=d["resources"])),
    ],
)
def test_validation_can_fail(where: str, break_it: Any) -> None:
    doc = copy.deepcopy(documents(K8S / where)[0])
    break_it(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def by_kind() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in manifests():
        if path.parent.name == "examples":
            continue
        for doc in documents(path):
            found[(doc["kind"], doc.get("metadata", {}).get("name", ""))] = doc
    return found


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    namespace = documents(K8S / "namespace.yaml")[0]["metadata"]["name"]
    assert kustomization["namespace"] == namespace
    image_names = {i["name"] for i in kustomization["images"]}
    for (kind, _), doc in by_kind().items():
        if kind in ("DaemonSet", "Deployment"):
            assert {c["image"] for c in containers(doc)} <= image_names


def test_references_resolve() -> None:
    docs = by_kind()
    secrets = {name: set(d["stringData"]) for (kind, name), d in docs.items() if kind == "Secret"}
    config_maps = {name for kind, name in docs if kind == "ConfigMap"}
    for (kind, name), doc in docs.items():
        if kind not in ("DaemonSet", "Deployment"):
            continue
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (name, env["name"])
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (name, mount["name"])
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "secret" in volume:
                keys = {i["key"] for i in volume["secret"].get("items", [])}
                assert keys <= secrets[volume["secret"]["secretName"]]
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # every Service and ServiceMonitor selects something
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"]
        for (kind, _), d in docs.items()
        if kind in ("DaemonSet", "Deployment")
    ]
    services = [d for (kind, _), d in docs.items() if kind == "Service"]
    for service in services:
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pod_labels), service["metadata"]
    for (kind, _), monitor in docs.items():
        if kind == "ServiceMonitor":
            wanted = monitor["spec"]["selector"]["matchLabels"].items()
            matched = [s for s in services if wanted <= s["metadata"].get("labels", {}).items()]
            assert matched, monitor["metadata"]["name"]
            ports = {p["name"] for s in matched for p in s["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in ports
                ref = endpoint["authorization"]["credentials"]
                assert ref["key"] in secrets[ref["name"]]


def env_of(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment, with $(VAR) expanded and downward-API fields filled in."""
    fields = {"spec.nodeName": "gpu-node-17", "status.hostIP": "10.1.2.3"}
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = item["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[item["name"]] = value
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def test_pcache_daemonset_config_loads_as_the_worker_would(tmp_path: Path) -> None:
    docs = by_kind()
    secrets = {name: d["stringData"] for (kind, name), d in docs.items() if kind == "Secret"}
    daemonset = docs[("DaemonSet", "pcache-node")]
    pod = daemonset["spec"]["template"]["spec"]
    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    config_path = tmp_path / "pcache.toml"
    config_path.write_text(docs[("ConfigMap", "pcache")]["data"]["pcache.toml"])
    config = WorkerConfig.load(config_path, env=env_of(worker, secrets))
    assert config.node_id == "gpu-node-17"  # from the node name: stable across pod restarts
    assert config.address == "http://10.1.2.3:7070"
    for url in config.backends.values():  # credentials reach every backend's profile
        profile = config.profiles.profile(url.split("://")[1].split("@")[0], "s3")
        assert profile.access_key_id and profile.secret_access_key, url
    host, port = parse_dns_target(config.peers_dns, config.port)
    service = docs[("Service", "pcache-workers")]
    namespace = documents(K8S / "kustomization.yaml")[0]["namespace"]
    assert host.split(".")[:2] == [service["metadata"]["name"], namespace]
    assert service["spec"]["clusterIP"] == "None"  # headless: one address per worker
    assert port == service["spec"]["ports"][0]["port"] == config.port
    assert pod["hostNetwork"] and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # every cache dir is a hostPath volume mounted where the config says
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for cache_dir in config.cache_dirs:
        volume = volumes[mounts[str(cache_dir.path)]]
        assert "hostPath" in volume, cache_dir.path
    assert "hostPath" in volumes[mounts[str(config.state_dir)]]
    # the mounts: /dev/fuse, Bidirectional propagation, and namespaces the worker serves
    for c in pod["containers"]:
        if c["name"].startswith("mount-"):
            assert c["securityContext"]["privileged"] is True
            assert {m["mountPath"]: m.get("mountPropagation") for m in c["volumeMounts"]}[
                "/mnt/pcache"
            ] == "Bidirectional"
            assert volumes["fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
            script = c["command"][-1]
            namespace_arg = script.split("pcache mount ")[1].split()[0]
            assert namespace_arg in config.backends
    # the training example sees the mounts
    example = documents(K8S / "examples/training-job.yaml")[0]
    trainer_mount = example["spec"]["containers"][0]["volumeMounts"][0]
    assert trainer_mount["mountPropagation"] == "HostToContainer"


def test_babel_sync_deployment_config_loads_as_the_service_would(tmp_path: Path) -> None:
    docs = by_kind()
    secrets = {name: d["stringData"] for (kind, name), d in docs.items() if kind == "Secret"}
    deployment = docs[("Deployment", "babel-sync")]
    serve = containers(deployment)[0]
    serve_toml = docs[("ConfigMap", "babel-sync")]["data"]["serve.toml"]
    config_path = tmp_path / "serve.toml"
    config_path.write_text(serve_toml)
    config = ServiceConfig.load(str(config_path), env=env_of(serve, secrets))
    mounts = {m["mountPath"]: m["name"] for m in serve["volumeMounts"]}
    assert config.objstore_config is not None
    profiles_dir = str(Path(config.objstore_config).parent)
    assert mounts[profiles_dir] == "profiles"
    assert mounts[str(config.state_dir)] == "state"
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(secrets["babel-sync"]["profiles.toml"])
    loaded = Config.load(profiles, env={})
    assert {"region-a", "region-b"} <= set(tomllib.loads(profiles.read_text())["profiles"])
    assert loaded.profile("region-b", "s3").endpoint.startswith("https://")
    assert deployment["spec"]["replicas"] == 1  # one LMDB job database
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    port = int(config.listen.rpartition(":")[2])
    assert serve["ports"][0]["containerPort"] == port
    assert serve["securityContext"]["readOnlyRootFilesystem"] is True
