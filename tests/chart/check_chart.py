#!/usr/bin/env python3
"""Checks the Helm chart charts/ferry offline, and renders it for process tests.

Runs in its own venv (scripts/setup.sh creates it from scripts/requirements-chart.txt):

    .venv-chart/bin/python tests/chart/check_chart.py check
    .venv-chart/bin/python tests/chart/check_chart.py render --set-json '{"workers": {"replicas": 2}}'
    .venv-chart/bin/python tests/chart/check_chart.py alerts      # the alert rules file's path
    .venv-chart/bin/python tests/chart/check_chart.py queries     # every PromQL expression, as JSON

`check` renders the chart with its defaults and several value sets, lints it strictly, validates
every manifest with kubernetes-validate --strict (CRDs such as ServiceMonitor are only warned
about: their schemas are not bundled, so the script checks their key fields itself), scans the
manifests with checkov (every failed check must be in CHECKOV_SKIPS, with its reason), checks
that values.schema.json refuses wrong keys and types, checks what the pods run (the restricted
Pod Security Standard, ferryd's config keys against daemon/src/config.rs, probes, GPUs, the
bundled etcd's members), the alert rules and the dashboard's queries (with promtool, when
installed), that docs/deploy.md lists every value, and, when target/debug/ferryd exists, that
ferryd accepts the rendered config. No Kubernetes API server and no helm binary are needed:
helm-python-sdk bundles Helm as a library.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ferry"
ALERTS = CHART / "files" / "alerts.yaml"
ALERTS_TEST = Path(__file__).resolve().parent / "alerts_test.yaml"
DASHBOARD = CHART / "dashboards" / "ferry.json"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
CONFIG_RS = REPO / "daemon" / "src" / "config.rs"
FERRYD = REPO / "target" / "debug" / "ferryd"
VENV_BIN = Path(sys.executable).parent
KUBE_VERSIONS = ["1.25.0", "1.37.0"]  # the chart's kubeVersion floor, and the newest bundled
RESTRICTED_UID = 10001

# checkov checks that fail on purpose, each with its reason. Any other failed check fails `check`.
CHECKOV_SKIPS = {
    "CKV_K8S_11": "no CPU limits: CFS quotas throttle training and data loading; CPU requests are set",
    "CKV_K8S_15": "imagePullPolicy IfNotPresent: tags are pinned (appVersion, etcd v3.5.x) and the ferry image is"
    " several GB; image.pullPolicy can say Always",
    "CKV_K8S_35": "the API token (and etcd password) reach ferryd as environment variables: ferryd reads FERRY_TOKEN"
    " and has no token-file option",
    "CKV_K8S_43": "tags, not digests, by default: set image.tag / etcd.image.tag to TAG@sha256:DIGEST to pin a digest",
}

# Value sets that `check` renders besides the defaults.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "external-etcd-tls": {
        "etcd": {
            "external": {
                "endpoints": ["https://etcd-0.etcd.infra.svc:2379", "https://etcd-1.etcd.infra.svc:2379",
                              "https://etcd-2.etcd.infra.svc:2379"],
                "tls": {"enabled": True, "existingSecret": "etcd-client-tls"},
                "auth": {"user": "ferry", "existingSecret": "etcd-ferry-password"},
            }
        },
        "auth": {"existingSecret": "ferry-api-token", "existingSecretKey": "api-token"},
        "cluster": {"name": "prod"},
        "storage": {
            "outputs": {"existingClaim": "ferry-runs"},
            "data": {"existingClaim": "datasets"},
            "models": {"existingClaim": "model-zoo", "subPath": "pretrained"},
        },
        "networkPolicy": {"apiFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml-users"}}}]},
    },
    "gpu-workers": {
        "workers": {
            "replicas": 4,
            "gpus": 1,
            "labels": {"gpu": "h200", "zone": "a"},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
            "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "128Gi"}},
            "shmSize": "16Gi",
        },
        "storage": {"state": {"persistent": True, "size": "50Gi", "storageClass": "local-ssd"}},
        "config": {"workerThreads": 8, "ncclLibrary": "/opt/nccl/lib/libnccl.so.2", "extra": {"progress_interval_ms": 500}},
        "etcd": {"replicas": 3},
    },
    "daemonset": {
        "workers": {
            "kind": "DaemonSet",
            "gpus": 8,
            "nodeSelector": {"node.kubernetes.io/instance-type": "gpu-8x"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "config": {"maxRunningJobs": 2},
    },
    "teachers": {
        "teachers": {"replicas": 2, "gpus": 1, "labels": {"pool": "teachers"}},
        "workers": {"replicas": 3},
        "etcd": {"replicas": 3},
        "storage": {"state": {"persistent": True}},
    },
    "monitoring": {
        "monitoring": {
            "skipCapabilityCheck": True,
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        },
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "ferry"}},
        "networkPolicy": {"apiFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
                                      {"podSelector": {"matchLabels": {"app": "ferryctl"}}}]},
    },
}

# Values that must be refused, with a piece of the message that says why.
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("a wrong key", {"workers": {"replica": 3}}, "additional properties 'replica' not allowed"),
    ("a wrong key at the top", {"worker": {"replicas": 3}}, "additional properties 'worker' not allowed"),
    ("a wrong type", {"workers": {"replicas": "three"}}, "want integer"),
    ("a wrong type (bool)", {"networkPolicy": {"enabled": "yes"}}, "want boolean"),
    ("a wrong enum", {"workers": {"kind": "Deployment"}}, "value must be one of"),
    ("an even etcd", {"etcd": {"replicas": 2}}, "etcd/replicas"),
    ("a chart-managed key in config.extra", {"config": {"extra": {"listen": "0.0.0.0:1"}}}, "invalid propertyName 'listen'"),
    ("a too short node TTL", {"config": {"nodeTtlMs": 1000}}, "nodeTtlMs"),
    ("a wrong etcd URL", {"etcd": {"external": {"endpoints": ["etcd:2379"]}}}, "endpoints/0"),
    ("monitoring without its CRDs", {"monitoring": {"serviceMonitor": {"enabled": True}}}, "monitoring.coreos.com/v1"),
    ("a PrometheusRule without its CRDs", {"monitoring": {"prometheusRule": {"enabled": True}}}, "monitoring.skipCapabilityCheck"),
    ("persistent state in a DaemonSet", {"workers": {"kind": "DaemonSet"}, "storage": {"state": {"persistent": True}}},
     "needs workers.kind=StatefulSet"),
    ("etcd TLS without its Secret", {"etcd": {"external": {"endpoints": ["https://e:2379"], "tls": {"enabled": True}}}},
     "etcd.external.tls.existingSecret is required"),
    ("an etcd user without its password", {"etcd": {"external": {"endpoints": ["https://e:2379"], "auth": {"user": "u"}}}},
     "etcd.external.auth.existingSecret is required"),
]

# Schema nodes that may hold free-form keys: maps of strings, Kubernetes objects passed through.
FREE_FORM_OK = re.compile(
    r"^/(workers|teachers)/(labels|nodeSelector|podAnnotations|podLabels|affinity|resources/(requests|limits))$"
    r"|^/etcd/(nodeSelector|podAnnotations|affinity|resources/(requests|limits))$"
    r"|^/(api/service|serviceAccount|dashboard)/annotations$|^/(monitoring/\w+|dashboard)/labels$"
    r"|^/config/extra$|^/networkPolicy/apiFrom\[\]/(podSelector|namespaceSelector|ipBlock)$"
    r"|^/(workers|teachers|etcd)/tolerations\[\]$|^/(workers|teachers)/extraEnv\[\]/valueFrom$"
)


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def fail(msg: str) -> None:
    print(f"check_chart: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Rendering


def render(values: dict[str, Any], release: str = "ferry", namespace: str = "ferry") -> dict[str, str]:
    with Chart.load(CHART) as chart:
        return chart.render(values=values, name=release, namespace=namespace)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of a render (NOTES.txt left out); raises on YAML that does not parse."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        try:
            loaded = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            raise ValueError(f"{path} renders invalid YAML: {e}") from e
        for d in loaded:
            if d is None:
                continue
            if not isinstance(d, dict) or not {"apiVersion", "kind", "metadata"} <= d.keys():
                raise ValueError(f"{path} renders something that is not a Kubernetes object: {str(d)[:200]}")
            d.setdefault("metadata", {})["__template"] = path
            docs.append(d)
    return docs


def strip(doc: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(doc)
    d["metadata"].pop("__template", None)
    return d


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


WORKLOADS = ("StatefulSet", "DaemonSet", "Deployment", "Job", "CronJob", "ReplicaSet", "Pod")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]
    return doc["spec"]["template"]["spec"]


def ferry_nodes(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workloads that run ferryd (workers and teachers)."""
    out = []
    for d in docs:
        if d["kind"] in WORKLOADS:
            comp = d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            if comp in ("worker", "teacher"):
                out.append(d)
    return out


def ferryd_container(doc: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod_spec(doc)["containers"] if c["name"] == "ferryd")


def config_of(doc: dict[str, Any], docs: list[dict[str, Any]]) -> tuple[str, str]:
    """ferryd's config file of a workload: (its content, where it is mounted)."""
    spec = pod_spec(doc)
    c = ferryd_container(doc)
    args = c.get("args", [])
    path = args[args.index("--config") + 1]
    for m in c["volumeMounts"]:
        vol = next(v for v in spec["volumes"] if v["name"] == m["name"]) if any(
            v["name"] == m["name"] for v in spec.get("volumes", [])) else None
        if vol is None or "configMap" not in vol:
            continue
        for item in vol["configMap"].get("items", []):
            if f"{m['mountPath'].rstrip('/')}/{item['path']}" == path:
                cm = find(docs, "ConfigMap", vol["configMap"]["name"])
                if cm is None:
                    raise ValueError(f"ConfigMap {vol['configMap']['name']} is not rendered")
                return cm["data"][item["key"]], path
    raise ValueError(f"{doc['metadata']['name']}: no ConfigMap is mounted at {path}")


def process_view(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """What a process test needs to run the rendered ferryd pods outside Kubernetes."""
    pods = []
    for d in ferry_nodes(docs):
        spec = pod_spec(d)
        c = ferryd_container(d)
        config, config_path = config_of(d, docs)
        env = []
        for e in c.get("env", []):
            if "value" in e:
                env.append({"name": e["name"], "value": e["value"]})
            elif "fieldRef" in e.get("valueFrom", {}):
                env.append({"name": e["name"], "fieldRef": e["valueFrom"]["fieldRef"]["fieldPath"]})
            elif "secretKeyRef" in e.get("valueFrom", {}):
                r = e["valueFrom"]["secretKeyRef"]
                env.append({"name": e["name"], "secret": {"name": r["name"], "key": r["key"]}})
            else:
                env.append({"name": e["name"], "valueFrom": e.get("valueFrom")})
        # Volumes: "per_pod" ones (emptyDir, claim templates) are each pod's own; the others
        # (the shared claims, ConfigMaps, Secrets) are the same for every pod.
        volumes = {}
        for v in spec.get("volumes", []):
            kind = next(k for k in v if k != "name")
            volumes[v["name"]] = {"type": kind, "per_pod": kind == "emptyDir",
                                  **({} if not isinstance(v[kind], dict) else v[kind])}
        for t in d["spec"].get("volumeClaimTemplates", []):
            volumes[t["metadata"]["name"]] = {"type": "volumeClaimTemplate", "per_pod": True,
                                              "accessModes": t["spec"]["accessModes"]}
        mounts = []
        for m in c.get("volumeMounts", []):
            entry = {"path": m["mountPath"], "volume": m["name"], "readOnly": bool(m.get("readOnly", False))}
            if m.get("subPath"):
                entry["subPath"] = m["subPath"]
            mounts.append(entry)
        values = yaml.safe_load(config)
        # The config's paths, and the mount (volume) each lies on.
        paths = []
        for key, path in [("data_dir", values.get("data_dir"))] + [
                (f"roots.{k}", v) for k, v in sorted(values.get("roots", {}).items())] + [
                (k, values.get(k)) for k in ("etcd_ca", "etcd_cert", "etcd_key", "nccl_library")]:
            if not path:
                continue
            m = max((m for m in mounts if path == m["path"] or path.startswith(m["path"].rstrip("/") + "/")),
                    key=lambda m: len(m["path"]), default=None)
            paths.append({"key": key, "path": path, "volume": m["volume"] if m else None,
                          "readOnly": m["readOnly"] if m else None})
        pods.append({
            "kind": d["kind"],
            "name": d["metadata"]["name"],
            "role": values.get("role", "worker"),
            "config": config,
            "config_path": config_path,
            "config_values": values,
            "config_paths": paths,
            # Settings that only hold inside the cluster: a test on one host overrides them
            # with these variables (FERRY_* beats the file), e.g. one loopback address per pod.
            "cluster_only": {"listen": {"value": values.get("listen"), "env": "FERRY_LISTEN"},
                             "etcd": {"value": values.get("etcd"), "env": "FERRY_ETCD"}},
            "command": c.get("command", []),
            "args": c.get("args", []),
            "env": env,
            "mounts": mounts,
            "volumes": volumes,
            "replicas": d["spec"].get("replicas") if d["kind"] != "DaemonSet" else None,
            "port": next(p["containerPort"] for p in c["ports"] if p["name"] == "http"),
        })
    token = None
    secret_ref = None
    if pods:
        ref = next((e["secret"] for e in pods[0]["env"] if e["name"] == "FERRY_TOKEN"), None)
        if ref:
            secret_ref = ref
            s = find(docs, "Secret", ref["name"])
            if s is not None and ref["key"] in s.get("data", {}):
                token = base64.b64decode(s["data"][ref["key"]]).decode()
    return {"pods": pods, "token": token, "token_secret": secret_ref}


# ---------------------------------------------------------------------------------------------
# What ferryd accepts (read from its source, so that the chart follows the daemon)


def ferryd_keys() -> tuple[set[str], set[str], set[str]]:
    """(the Config struct's fields, RootsConfig's fields, the FERRY_* keys) from config.rs."""
    src = CONFIG_RS.read_text()

    def fields(struct: str) -> set[str]:
        m = re.search(r"pub struct " + struct + r" \{(.*?)\n\}", src, re.S)
        if not m:
            fail(f"cannot find struct {struct} in {CONFIG_RS}")
        return set(re.findall(r"^\s*pub (\w+):", m.group(1), re.M))

    m = re.search(r"const KEYS: &\[&str\] = &\[(.*?)\];", src, re.S)
    if not m:
        fail(f"cannot find KEYS in {CONFIG_RS}")
    return fields("Config"), fields("RootsConfig"), set(re.findall(r'"(\w+)"', m.group(1)))


# ---------------------------------------------------------------------------------------------
# The checks


class Checks:
    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            out = fn()
        except AssertionError as e:
            self.failed.append((name, str(e) or "assertion failed"))
            print(f"FAIL {name}: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - every error is a failed check here
            self.failed.append((name, f"{type(e).__name__}: {e}"))
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            return None
        self.passed.append(name)
        print(f"ok   {name}")
        return out


def check_lint(values: dict[str, Any]) -> None:
    report = lint(CHART, values, strict=True, namespace="ferry")
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    assert not report.get("errors") and not bad, f"helm lint --strict: {report.get('errors')} {bad}"


def check_pss(docs: list[dict[str, Any]]) -> None:
    """The restricted Pod Security Standard on every pod, and no host access."""
    for d in docs:
        if d["kind"] not in WORKLOADS:
            continue
        where = f"{d['kind']}/{d['metadata']['name']}"
        spec = pod_spec(d)
        sc = spec.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
        assert sc.get("runAsUser") == RESTRICTED_UID and sc.get("runAsGroup") == RESTRICTED_UID, f"{where}: uid/gid"
        assert sc.get("fsGroup") == RESTRICTED_UID, f"{where}: fsGroup"
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(k), f"{where}: {k}"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken"
        for v in spec.get("volumes", []):
            assert "hostPath" not in v, f"{where}: hostPath volume {v['name']}"
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            csc = c.get("securityContext", {})
            cw = f"{where} container {c['name']}"
            assert csc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation"
            assert csc.get("privileged") in (None, False), f"{cw}: privileged"
            assert "ALL" in csc.get("capabilities", {}).get("drop", []), f"{cw}: capabilities.drop ALL"
            assert not csc.get("capabilities", {}).get("add"), f"{cw}: capabilities.add"
            assert csc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem"
            assert csc.get("runAsNonRoot", sc.get("runAsNonRoot")) is True, f"{cw}: runAsNonRoot"
            assert c.get("livenessProbe") and c.get("readinessProbe"), f"{cw}: probes"
            for p in c.get("ports", []):
                assert "hostPort" not in p, f"{cw}: hostPort"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{cw}: /tmp must be a volume (read-only root filesystem)"


def check_ferry_pods(docs: list[dict[str, Any]], values: dict[str, Any], merged: dict[str, Any]) -> None:
    fields, roots_fields, env_keys = ferryd_keys()
    nodes = ferry_nodes(docs)
    assert nodes, "no ferryd workload rendered"
    kinds = {(d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"], d["kind"]) for d in nodes}
    assert ("worker", merged["workers"]["kind"]) in kinds, f"workers: {kinds}"
    assert any(c == "teacher" for c, _ in kinds) == (merged["teachers"]["replicas"] > 0), f"teachers: {kinds}"
    bundled = not merged["etcd"]["external"]["endpoints"]
    for d in nodes:
        where = f"{d['kind']}/{d['metadata']['name']}"
        comp = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        spec_values = merged["workers" if comp == "worker" else "teachers"]
        if d["kind"] == "StatefulSet":
            assert d["spec"]["podManagementPolicy"] == "Parallel", f"{where}: podManagementPolicy"
            svc = find(docs, "Service", d["spec"]["serviceName"])
            assert svc is not None and svc["spec"].get("clusterIP") == "None", f"{where}: headless service"
        text, path = config_of(d, docs)
        cfg = yaml.safe_load(text)
        unknown = set(cfg) - fields
        assert not unknown, f"{where}: ferryd does not know config keys {sorted(unknown)}"
        assert set(cfg["roots"]) <= roots_fields, f"{where}: roots keys {sorted(cfg['roots'])}"
        assert cfg["role"] == comp, f"{where}: role {cfg['role']}"
        assert cfg["log_format"] == "json", f"{where}: log_format"
        assert cfg["listen"] == f"0.0.0.0:{merged['api']['port']}", f"{where}: listen {cfg['listen']}"
        assert "token" not in cfg and "etcd_password" not in cfg, f"{where}: secrets in the config file"
        assert cfg.get("etcd"), f"{where}: no etcd (ferryd would need --standalone)"
        assert re.fullmatch(r"[A-Za-z0-9._-]+", cfg["cluster"]), f"{where}: cluster {cfg['cluster']}"
        assert cfg.get("labels", {}) == spec_values["labels"], f"{where}: labels"
        c = ferryd_container(d)
        assert c["command"] == ["ferryd"] and c["args"] == ["--config", path], f"{where}: command {c['command']} {c['args']}"
        env = {e["name"]: e for e in c["env"]}
        for name in env:
            if name.startswith("FERRY_") and name not in ("FERRY_LOG", "FERRY_CONFIG"):
                key = name[len("FERRY_"):].lower()
                assert any(key == k or key.startswith(k + "__") for k in env_keys), f"{where}: ferryd ignores {name}"
        assert env["FERRY_DATA_PLANE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", f"{where}: FERRY_DATA_PLANE_IP must be the pod IP"
        assert env["FERRY_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", f"{where}: FERRY_NODE_NAME must be the pod name"
        assert "secretKeyRef" in env["FERRY_TOKEN"]["valueFrom"], f"{where}: FERRY_TOKEN from a Secret"
        if merged["etcd"]["external"]["auth"]["user"] and not bundled:
            assert "secretKeyRef" in env["FERRY_ETCD_PASSWORD"]["valueFrom"], f"{where}: FERRY_ETCD_PASSWORD"
            assert cfg["etcd_user"] == merged["etcd"]["external"]["auth"]["user"], f"{where}: etcd_user"
        probes = (c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"])
        assert probes == ("/healthz", "/readyz"), f"{where}: probes {probes}"
        res = c.get("resources", {})
        gpu = spec_values["gpuResource"]
        assert gpu not in res.get("requests", {}), f"{where}: GPUs in requests"
        if spec_values["gpus"] > 0:
            assert res["limits"][gpu] == spec_values["gpus"], f"{where}: GPU limit"
        else:
            assert gpu not in res.get("limits", {}), f"{where}: GPU limit without gpus"
        spec = pod_spec(d)
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for root in ("data", "models", "outputs"):
            assert cfg["roots"][root] in mounts, f"{where}: roots.{root} is not a mount"
        assert not mounts[cfg["roots"]["outputs"]].get("readOnly"), f"{where}: outputs read-only"
        assert mounts[cfg["roots"]["data"]].get("readOnly") and mounts[cfg["roots"]["models"]].get("readOnly"), f"{where}: data/models not read-only"
        out_vol = vols[mounts[cfg["roots"]["outputs"]]["name"]]
        claim = out_vol["persistentVolumeClaim"]["claimName"]
        if not merged["storage"]["outputs"]["existingClaim"]:
            pvc = find(docs, "PersistentVolumeClaim", claim)
            assert pvc is not None and pvc["spec"]["accessModes"] == ["ReadWriteMany"], f"{where}: outputs PVC RWX"
        else:
            assert claim == merged["storage"]["outputs"]["existingClaim"], f"{where}: outputs claim {claim}"
        state = mounts[cfg["data_dir"]]["name"]
        if merged["storage"]["state"]["persistent"] and d["kind"] == "StatefulSet":
            assert state not in vols and any(t["metadata"]["name"] == state for t in d["spec"]["volumeClaimTemplates"]), f"{where}: data_dir not on a claim template"
        else:
            assert "emptyDir" in vols[state], f"{where}: data_dir on an emptyDir"
        shm = vols[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm.get("medium") == "Memory" and shm.get("sizeLimit") == spec_values["shmSize"], f"{where}: /dev/shm"
        assert "emptyDir" in vols[mounts["/tmp"]["name"]], f"{where}: /tmp"
        if not bundled and merged["etcd"]["external"]["tls"]["enabled"]:
            for k in ("etcd_ca", "etcd_cert", "etcd_key"):
                f = cfg[k]
                mount_dir = str(Path(f).parent)
                assert mount_dir in mounts and "secret" in vols[mounts[mount_dir]["name"]], f"{where}: {k} not mounted"
                items = [i["path"] for i in vols[mounts[mount_dir]["name"]]["secret"]["items"]]
                assert Path(f).name in items, f"{where}: {k} not in the Secret's items"
        if bundled:
            sts = find(docs, "StatefulSet", d["metadata"]["name"].rsplit("-", 1)[0] + "-etcd")
            assert sts is not None, f"{where}: no bundled etcd"
            for url in cfg["etcd"].split(","):
                host = re.match(r"http://([^:/]+):2379$", url).group(1)
                pod, svc, ns = host.split(".")[:3]
                assert svc == sts["spec"]["serviceName"] and pod.rsplit("-", 1)[0] == sts["metadata"]["name"], f"{where}: etcd URL {url} is no member"
                assert int(pod.rsplit("-", 1)[1]) < sts["spec"]["replicas"], f"{where}: etcd URL {url} beyond the members"
        else:
            assert cfg["etcd"] == ",".join(merged["etcd"]["external"]["endpoints"]), f"{where}: etcd endpoints"
            assert not by_kind([x for x in docs if "etcd" in x["metadata"]["name"]], "StatefulSet"), "external etcd: none bundled"


def check_etcd(docs: list[dict[str, Any]], merged: dict[str, Any]) -> None:
    if merged["etcd"]["external"]["endpoints"]:
        return
    sts = [d for d in by_kind(docs, "StatefulSet") if d["spec"]["template"]["metadata"]["labels"].get(
        "app.kubernetes.io/component") == "etcd"]
    assert len(sts) == 1, "one etcd StatefulSet"
    s = sts[0]
    n = merged["etcd"]["replicas"]
    assert s["spec"]["replicas"] == n and s["spec"]["podManagementPolicy"] == "Parallel", "etcd replicas/policy"
    c = pod_spec(s)["containers"][0]
    image = c["image"]
    assert image.split(":")[0] in ("gcr.io/etcd-development/etcd", "quay.io/coreos/etcd"), f"etcd image {image}"
    assert re.search(r":v3\.5\.\d+$", image), f"etcd image not pinned to v3.5.x: {image}"
    args = dict(a[2:].split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)
    members = dict(m.split("=", 1) for m in args["initial-cluster"].split(","))
    ns = s["metadata"]["namespace"]
    svc = s["spec"]["serviceName"]
    expect = {f"{s['metadata']['name']}-{i}": f"http://{s['metadata']['name']}-{i}.{svc}.{ns}.svc:2380" for i in range(n)}
    assert members == expect, f"initial-cluster {members}"
    assert args["name"] == "$(POD_NAME)" and args["initial-advertise-peer-urls"] == f"http://$(POD_NAME).{svc}.{ns}.svc:2380"
    headless = find(docs, "Service", svc)
    assert headless and headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"], f"etcd headless Service {svc}"
    assert s["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data", "etcd PVC"
    data_mount = next(m for m in c["volumeMounts"] if m["name"] == "data")["mountPath"]
    assert args["data-dir"].startswith(data_mount + "/"), "etcd data-dir on its PVC"
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget") if p["spec"]["selector"]["matchLabels"].get(
        "app.kubernetes.io/component") == "etcd"]
    if merged["etcd"]["pdb"]["enabled"]:
        assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == max(1, (n - 1) // 2), "etcd PDB"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_references(docs: list[dict[str, Any]], merged: dict[str, Any]) -> None:
    """Selectors select something, and what pods and monitors refer to is rendered (or given)."""
    pods = [(d, d["spec"]["template"]["metadata"]["labels"]) for d in docs if d["kind"] in WORKLOADS]
    given = {merged["auth"]["existingSecret"], merged["etcd"]["external"]["tls"]["existingSecret"],
             merged["etcd"]["external"]["auth"]["existingSecret"], merged["storage"]["outputs"]["existingClaim"],
             merged["storage"]["data"]["existingClaim"], merged["storage"]["models"]["existingClaim"]} - {""}
    for d, _ in pods:
        spec = pod_spec(d)
        sa = spec.get("serviceAccountName")
        assert sa is None or find(docs, "ServiceAccount", sa) or not merged["serviceAccount"]["create"], f"SA {sa}"
        for v in spec.get("volumes", []):
            for kind, key in (("configMap", "name"), ("secret", "secretName"), ("persistentVolumeClaim", "claimName")):
                if kind in v:
                    ref = v[kind][key]
                    k8s_kind = {"configMap": "ConfigMap", "secret": "Secret", "persistentVolumeClaim": "PersistentVolumeClaim"}[kind]
                    assert find(docs, k8s_kind, ref) or ref in given, f"{d['metadata']['name']}: {k8s_kind} {ref} missing"
        for c in spec["containers"]:
            for e in c.get("env", []):
                r = e.get("valueFrom", {}).get("secretKeyRef")
                if r:
                    s = find(docs, "Secret", r["name"])
                    assert (s and r["key"] in s["data"]) or r["name"] in given, f"Secret {r['name']}/{r['key']} missing"
    for s in by_kind(docs, "Service"):
        sel = s["spec"].get("selector", {})
        matched = [d for d, labels in pods if selects(sel, labels)]
        assert matched, f"Service {s['metadata']['name']} selects no pods"
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort")
            if isinstance(tp, str):
                for d in matched:
                    names = {cp["name"] for c in pod_spec(d)["containers"] for cp in c.get("ports", [])}
                    assert tp in names, f"Service {s['metadata']['name']}: no port {tp} in {d['metadata']['name']}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for p in by_kind(docs, kind):
            sel = (p["spec"]["selector"] if kind == "PodDisruptionBudget" else p["spec"]["podSelector"])["matchLabels"]
            assert any(selects(sel, labels) for _, labels in pods), f"{kind} {p['metadata']['name']} selects no pods"
    for np in by_kind(docs, "NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                ps = peer.get("podSelector", {}).get("matchLabels")
                if ps and "namespaceSelector" not in peer and ps.get("app.kubernetes.io/instance"):
                    assert any(selects(ps, labels) for _, labels in pods), f"NetworkPolicy peer {ps} selects no pods"
    for sm in by_kind(docs, "ServiceMonitor"):
        svcs = [s for s in by_kind(docs, "Service") if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(svcs) == 1, f"ServiceMonitor selects {len(svcs)} Services"
        ep = sm["spec"]["endpoints"][0]
        assert ep["port"] in {p["name"] for p in svcs[0]["spec"]["ports"]} and ep["path"] == "/metrics", "ServiceMonitor port/path"
        cred = ep["authorization"]["credentials"]
        assert ep["authorization"].get("type", "Bearer") == "Bearer", "ServiceMonitor: bearer"
        s = find(docs, "Secret", cred["name"])
        assert (s and cred["key"] in s["data"]) or cred["name"] in given, "ServiceMonitor: token Secret"
        assert sm["spec"]["jobLabel"] in svcs[0]["metadata"]["labels"], "ServiceMonitor jobLabel"
        assert svcs[0]["metadata"]["labels"][sm["spec"]["jobLabel"]] == "ferry", "scrape job is not named ferry"


def check_network_policy(docs: list[dict[str, Any]], merged: dict[str, Any]) -> None:
    nps = by_kind(docs, "NetworkPolicy")
    if not merged["networkPolicy"]["enabled"]:
        assert not nps
        return
    ferry = next(n for n in nps if "app.kubernetes.io/component" not in n["spec"]["podSelector"]["matchLabels"])
    rules = ferry["spec"]["ingress"]
    own = [r for r in rules if "ports" not in r]
    assert len(own) == 1 and all("podSelector" in p and "namespaceSelector" not in p for p in own[0]["from"]), "own pods, any port"
    api = [r for r in rules if "ports" in r]
    assert len(api) == 1 and api[0]["ports"] == [{"port": "http", "protocol": "TCP"}], "the API port"
    assert api[0].get("from", []) == merged["networkPolicy"]["apiFrom"], "apiFrom"
    if not merged["etcd"]["external"]["endpoints"]:
        etcd = next(n for n in nps if n["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "etcd")
        ports = sorted(p["port"] for r in etcd["spec"]["ingress"] for p in r["ports"])
        assert ports == ["client", "peer"], f"etcd ports {ports}"
        for r in etcd["spec"]["ingress"]:
            assert all("namespaceSelector" not in p and "ipBlock" not in p for p in r["from"]), "etcd: only pods here"


def check_monitoring(docs: list[dict[str, Any]], merged: dict[str, Any]) -> None:
    sm = by_kind(docs, "ServiceMonitor")
    pr = by_kind(docs, "PrometheusRule")
    cms = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert bool(sm) == merged["monitoring"]["serviceMonitor"]["enabled"], "ServiceMonitor on/off"
    assert bool(pr) == merged["monitoring"]["prometheusRule"]["enabled"], "PrometheusRule on/off"
    assert bool(cms) == merged["dashboard"]["enabled"], "dashboard on/off"
    for s in sm:
        assert s["apiVersion"] == "monitoring.coreos.com/v1"
        ep = s["spec"]["endpoints"][0]
        assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "authorization"}, f"endpoint keys {set(ep)}"
        assert set(ep["authorization"]["credentials"]) == {"name", "key"}
    for p in pr:
        assert p["apiVersion"] == "monitoring.coreos.com/v1"
        assert p["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], "PrometheusRule == files/alerts.yaml"
        for g in p["spec"]["groups"]:
            for r in g["rules"]:
                assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "record", "keep_firing_for"}, f"rule keys {set(r)}"
    for c in cms:
        assert json.loads(c["data"]["ferry.json"]) == json.loads(DASHBOARD.read_text()), "dashboard ConfigMap == ferry.json"


def check_kubernetes_validate(dirs: list[Path]) -> list[str]:
    files = sorted(str(f) for d in dirs for f in d.glob("*.yaml"))
    warnings = []
    for v in KUBE_VERSIONS:
        p = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", v, *files],
                           capture_output=True, text=True)
        out = (p.stdout + p.stderr).strip()
        errors = [line for line in out.splitlines() if not line.startswith(("WARN", "INFO"))]
        assert p.returncode == 0 and not errors, f"kubernetes-validate --strict -k {v}:\n" + "\n".join(errors or [out])
        warnings += [line for line in out.splitlines() if line.startswith("WARN")]
    for w in warnings:
        assert "Couldn't find schema for kind" in w and "monitoring.coreos.com" in w, f"unexpected warning: {w}"
    return sorted({re.search(r"kind (\w+)", w).group(1) for w in warnings})


def check_checkov(root: Path) -> dict[str, list[str]]:
    p = subprocess.run([str(VENV_BIN / "checkov"), "-d", str(root), "--framework", "kubernetes", "-o", "json",
                        "--quiet", "--compact", "--skip-download"], capture_output=True, text=True,
                       env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_BANNER": "1"})
    try:
        data = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"checkov printed no JSON (exit {p.returncode}): {p.stderr[-2000:]}")
    reports = data if isinstance(data, list) else [data]
    failed: dict[str, list[str]] = {}
    parsed = 0
    for r in reports:
        if "results" not in r:
            continue
        parsed += r["summary"]["passed"] + r["summary"]["failed"]
        assert r["summary"]["parsing_errors"] == 0, f"checkov parsing errors: {r['summary']}"
        for c in r["results"]["failed_checks"]:
            where = Path(c["file_path"]).parts[1] if len(Path(c["file_path"]).parts) > 1 else c["file_path"]
            failed.setdefault(c["check_id"], []).append(f"{c['check_name']}: {c['resource']} ({where})")
    assert parsed > 0, "checkov ran no check"
    unexpected = {k: v for k, v in failed.items() if k not in CHECKOV_SKIPS}
    assert not unexpected, "checkov failed checks that are not skipped:\n" + "\n".join(
        f"  {k} {v[0].split(':')[0]}: {', '.join(x.split(': ', 1)[1] for x in v)}" for k, v in sorted(unexpected.items()))
    return failed


def check_refused(name: str, values: dict[str, Any], expect: str) -> None:
    try:
        render(values)
    except HelmError as e:
        assert expect in str(e), f"refused, but the message does not say {expect!r}: {e}"
        return
    raise AssertionError(f"{name} was accepted: {values}")


def walk_schema(node: dict[str, Any], path: str, problems: list[str]) -> None:
    if "type" not in node and not any(k in node for k in ("oneOf", "anyOf", "enum", "not")):
        problems.append(f"{path or '/'}: no type")
    if node.get("type") == "object":
        if node.get("additionalProperties") is not False and not FREE_FORM_OK.match(path):
            problems.append(f"{path or '/'}: additionalProperties is not false")
        for k, v in node.get("properties", {}).items():
            walk_schema(v, f"{path}/{k}", problems)
        if isinstance(node.get("additionalProperties"), dict):
            ap = node["additionalProperties"]
            if "type" not in ap and "oneOf" not in ap:
                problems.append(f"{path}: map values have no type")
    if node.get("type") == "array":
        items = node.get("items")
        if not isinstance(items, dict):
            problems.append(f"{path}: array items have no schema")
        else:
            walk_schema(items, f"{path}[]", problems)
    for alt in node.get("oneOf", []):
        if alt.get("type") == "object":
            walk_schema(alt, path, problems)


def leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            if p.endswith(("resources", "extra")) or p.endswith(".resources.requests"):
                out.append(p)
                continue
            out += leaves(v, p + ".")
        else:
            out.append(p)
    return out


def check_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema.get("$schema") == "http://json-schema.org/draft-07/schema#", "draft-07"
    jsonschema.Draft7Validator.check_schema(schema)
    problems: list[str] = []
    walk_schema(schema, "", problems)
    assert not problems, "schema: " + "; ".join(problems)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    missing = []

    def cover(node: dict[str, Any], vals: Any, path: str) -> None:
        if node.get("type") == "object" and node.get("additionalProperties") is False:
            for k in node.get("properties", {}):
                if not isinstance(vals, dict) or k not in vals:
                    missing.append(f"{path}{k}")
                else:
                    cover(node["properties"][k], vals[k], f"{path}{k}.")
    cover(schema, defaults, "")
    assert not missing, f"in the schema but not in values.yaml: {missing}"


def check_docs() -> None:
    text = DEPLOY_DOC.read_text()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in leaves(defaults) if f"`{p}`" not in text]
    assert not missing, f"docs/deploy.md does not describe {missing}"


COMPARISON = re.compile(r"^(?P<query>.*\S)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<threshold>-?[0-9]+(\.[0-9]+)?)$", re.S)
ALERT_NAMES = {"FerryJobFailed", "FerryNodeLost", "FerryJobNoProgress", "FerryTeacherFallback", "FerryStraggler"}


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def dashboard_queries() -> list[dict[str, Any]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    row = ""
    for p in dash["panels"]:
        if p["type"] == "row":
            row = p["title"]
            continue
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$job", ".*")
            out.append({"source": "dashboard", "row": row, "panel": p["title"], "refId": t["refId"],
                        "instant": bool(t.get("instant")), "expr": expr})
    return out


def all_queries() -> list[dict[str, Any]]:
    out = dashboard_queries()
    for r in alert_rules():
        m = COMPARISON.match(" ".join(r["expr"].split()))
        out.append({"source": "alert", "alert": r["alert"], "for": r.get("for", "0s"), "expr": r["expr"],
                    "query": m.group("query") if m else None, "op": m.group("op") if m else None,
                    "threshold": float(m.group("threshold")) if m else None})
    return out


def promtool(rules: dict[str, Any], what: str) -> None:
    if not shutil.which("promtool"):
        raise RuntimeError("promtool is not installed (apt-get install prometheus)")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(rules, f)
    try:
        p = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
        assert p.returncode == 0, f"promtool check rules ({what}):\n{p.stdout}{p.stderr}"
    finally:
        os.unlink(f.name)


def check_alerts() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert ALERT_NAMES <= names, f"missing alerts {ALERT_NAMES - names}"
    for r in rules:
        assert COMPARISON.match(" ".join(r["expr"].split())), f"{r['alert']}: expr is not `<query> <op> <threshold>`"
        assert r.get("labels", {}).get("severity") and r.get("annotations", {}).get("summary"), f"{r['alert']}: severity label and summary"
    p = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True) \
        if shutil.which("promtool") else None
    if p is None:
        raise RuntimeError("promtool is not installed (apt-get install prometheus)")
    assert p.returncode == 0, f"promtool check rules {ALERTS}:\n{p.stdout}{p.stderr}"
    # Each alert fires on synthetic series as ferryd nodes export them, and not on the others.
    p = subprocess.run(["promtool", "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True)
    assert p.returncode == 0, f"promtool test rules {ALERTS_TEST}:\n{p.stdout}{p.stderr}"
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text()))
    assert names <= tested, f"alerts without a unit test in {ALERTS_TEST.name}: {sorted(names - tested)}"


def check_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41, f"schemaVersion {dash['schemaVersion']}"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "ferry_job_info" in variables["job"]["definition"], "job variable"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Cluster", "Job", "Ranks", "Distillation", "Recovery"], f"rows {rows}"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: datasource"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']}: gridPos"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", f"{p['title']}: target datasource"
            if re.search(r"ferry_(job|rank|distill_(cache|fallback|teacher_wait)|allreduce|recoveries)_\w*\{", t["expr"]):
                assert '=~"$job"' in t["expr"], f"{p['title']}: per-job query without $job: {t['expr']}"
    queries = dashboard_queries()
    promtool({"groups": [{"name": "dashboard", "rules": [
        {"record": f"ferry:dashboard:q{i}", "expr": q["expr"]} for i, q in enumerate(queries)]}]}, "dashboard queries")


def running_job_series() -> list[dict[str, str]]:
    """Synthetic series of a running 3-rank distillation job on two nodes (a: ranks 0, 1; b:
    rank 2 and a teacher node), one recovery behind it, as docs/metrics.md names them. Every
    node exports the cluster-level gauges; per-job series come from rank 0's node."""
    job = 'job_id="j1", name="distil"'
    series: list[tuple[str, str]] = []
    for inst in ("a", "b", "t"):
        i = f'instance="{inst}"'
        series += [
            (f'ferry_build_info{{version="0.1.0", {i}}}', "1x40"),
            (f'ferry_nodes{{role="worker", {i}}}', "2x40"), (f'ferry_nodes{{role="teacher", {i}}}', "1x40"),
            (f'ferry_gpus{{{i}}}', "0x40"),
            (f'process_resident_memory_bytes{{{i}}}', "100000000x40"),
            (f'ferry_http_requests_total{{method="GET", route="/v1/jobs", status="200", {i}}}', "0+5x40"),
            (f'ferry_rank_exits_total{{outcome="failed", {i}}}', "0x10 1x30"),
        ]
        for ph, n in (("Pending", 1), ("Running", 1), ("Succeeded", 3), ("Failed", 1), ("Cancelled", 0)):
            series.append((f'ferry_jobs{{phase="{ph}", {i}}}', f"{n}x40"))
        for le in ("0.005", "0.05", "+Inf"):
            series.append((f'ferry_http_request_duration_seconds_bucket{{method="GET", route="/v1/jobs", le="{le}", {i}}}', "0+5x40"))
    a = 'instance="a"'
    series += [
        (f'ferry_jobs_finished_total{{phase="Succeeded", {a}}}', "0x5 1x10 2x10 3x15"),
        (f'ferry_jobs_finished_total{{phase="Failed", {a}}}', "0x20 1x20"),
        (f'ferry_job_info{{{job}, strategy="distillation", arch="mlp", device="cpu", ranks="3", precision="fp32", {a}}}', "1x40"),
        (f'ferry_job_step{{{job}, {a}}}', "0+10x40"), (f'ferry_job_total_steps{{{job}, {a}}}', "1000x40"),
        (f'ferry_job_epoch{{{job}, {a}}}', "1x20 2x20"), (f'ferry_job_learning_rate{{{job}, {a}}}', "0.01x40"),
        (f'ferry_job_generation{{{job}, {a}}}', "1x10 2x30"),
        (f'ferry_job_train_loss{{{job}, {a}}}', "2-0.04x40"), (f'ferry_job_val_accuracy{{{job}, {a}}}', "0.1+0.02x40"),
        (f'ferry_job_samples_per_second{{{job}, {a}}}', "320x40"),
        (f'ferry_job_steps_total{{{job}, {a}}}', "0+10x40"), (f'ferry_job_samples_total{{{job}, {a}}}', "0+320x40"),
        (f'ferry_recoveries_total{{{job}, {a}}}', "0x10 1x30"),
        (f'ferry_distill_cache_hit_ratio{{{job}, {a}}}', "0.5x40"), (f'ferry_distill_fallback_steps{{{job}, {a}}}', "0x20 3x20"),
        (f'ferry_distill_teacher_wait_ratio{{{job}, {a}}}', "0.05x40"),
        (f'ferry_checkpoint_bytes_total{{{a}}}', "0+1000000x40"),
    ]
    for name, les in (("ferry_job_duration_seconds", ("60", "600", "+Inf")), ("ferry_job_queue_seconds", ("1", "10", "+Inf")),
                      ("ferry_distill_teacher_request_seconds", ("0.01", "0.1", "+Inf")),
                      ("ferry_checkpoint_seconds", ("0.1", "1", "+Inf")), ("ferry_recovery_seconds", ("1", "10", "+Inf"))):
        parts = [f'part="{p}", ' for p in ("replace", "first_step", "total")] if name == "ferry_recovery_seconds" else \
            ['phase="Succeeded", '] if name == "ferry_job_duration_seconds" else [""]
        for part in parts:
            for k, le in enumerate(les):
                series.append((f'{name}_bucket{{{part}le="{le}", {a}}}', f"0+{k + 1}x40"))
            series += [(f"{name}_sum{{{part.rstrip(', ')}{', ' if part else ''}{a}}}", "0+2x40"),
                       (f"{name}_count{{{part.rstrip(', ')}{', ' if part else ''}{a}}}", "0+3x40")]
    for rank, inst, compute in (("0", "a", 1.0), ("1", "a", 1.0), ("2", "b", 1.6)):
        r = f'{job}, rank="{rank}", instance="{inst}"'
        for part, v in (("data", 0.1), ("compute", compute), ("teacher", 0.05), ("sync", 1.7 - compute), ("optimizer", 0.02)):
            series.append((f'ferry_rank_step_seconds{{{r}, part="{part}"}}', f"{v}x40"))
        series += [(f"ferry_allreduce_bytes_total{{{r}}}", "0+40000000x40"), (f"ferry_allreduce_seconds_total{{{r}}}", "0+4x40")]
    return [{"series": k, "values": v} for k, v in series]


def check_dashboard_data() -> None:
    """Every dashboard query returns data while a job runs: each becomes an alert on its
    absence, evaluated by promtool over synthetic series of a running job."""
    if not shutil.which("promtool"):
        raise RuntimeError("promtool is not installed (apt-get install prometheus)")
    queries = dashboard_queries()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
            {"alert": f"Empty{i}", "expr": f"absent({q['expr']})"} for i, q in enumerate(queries)]}]}))
        test = Path(tmp) / "test.yaml"
        test.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
            "interval": "1m", "input_series": running_job_series(),
            "alert_rule_test": [{"eval_time": "30m", "alertname": f"Empty{i}", "exp_alerts": []} for i in range(len(queries))],
        }]}))
        p = subprocess.run(["promtool", "test", "rules", str(test)], capture_output=True, text=True)
    if p.returncode != 0:
        empty = sorted({int(n) for n in re.findall(r"alertname: Empty(\d+)", p.stdout + p.stderr)})
        raise AssertionError("queries without data while a job runs:\n" + "\n".join(
            f"  {queries[i]['row']} / {queries[i]['panel']} {queries[i]['refId']}: {queries[i]['expr']}" for i in empty)
            + ("" if empty else "\n" + p.stdout + p.stderr))


def check_ferryd_accepts(view: dict[str, Any]) -> str:
    """Runs target/debug/ferryd on each rendered config (etcd unreachable): the config must load."""
    if not os.access(FERRYD, os.X_OK):
        return "skipped: no target/debug/ferryd"
    help_text = subprocess.run([str(FERRYD), "--help"], capture_output=True, text=True, timeout=60).stdout
    for pod in view["pods"]:
        for flag in [a for a in pod["args"] if a.startswith("--")]:
            assert flag in help_text, f"ferryd --help does not list {flag}"
    results = []
    for pod in view["pods"]:
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            cfg = t / "ferryd.yaml"
            cfg.write_text(pod["config"])
            for root in ("data", "models", "outputs", "state"):
                (t / root).mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
            for e in pod["env"]:
                if "value" in e:
                    env[e["name"]] = e["value"]
                elif e.get("fieldRef") == "status.podIP":
                    env[e["name"]] = "127.0.0.1"
                elif e.get("fieldRef") == "metadata.name":
                    env[e["name"]] = f"{pod['name']}-0"
                elif "secret" in e:
                    env[e["name"]] = view["token"] or "x" * 32
            env.update({"FERRY_ETCD": "http://127.0.0.1:9", "FERRY_ROOTS__DATA": str(t / "data"),
                        "FERRY_ROOTS__MODELS": str(t / "models"), "FERRY_ROOTS__OUTPUTS": str(t / "outputs"),
                        "FERRY_DATA_DIR": str(t / "state")})
            args = [a if a != pod["config_path"] else str(cfg) for a in pod["args"]]
            proc = subprocess.Popen([str(FERRYD), *args, "--listen", "127.0.0.1:0"], env=env, cwd=tmp,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                out, err = proc.communicate(timeout=15)
                running = False
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                running = True
            text = out + err
            assert "invalid configuration" not in text and "cannot read the configuration" not in text, \
                f"ferryd refuses the {pod['role']} config:\n{text[-2000:]}"
            assert running or "cannot connect to etcd" in text, f"ferryd stopped before it reached etcd:\n{text[-2000:]}"
            results.append(f"{pod['role']}: {'ran until stopped' if running else 'reached etcd'}")
    return "; ".join(results)


def merged_values(values: dict[str, Any]) -> dict[str, Any]:
    with Chart.load(CHART) as chart:
        return chart.merge_values(values)


def cmd_check(_: argparse.Namespace) -> int:
    checks = Checks()
    started = time.time()
    checks.run("values.schema.json: draft-07, every object closed and every value typed", check_schema)
    checks.run("docs/deploy.md describes every value", check_docs)
    work = Path(tempfile.mkdtemp(prefix="ferry-chart-"))
    dirs = []
    views: dict[str, dict[str, Any]] = {}
    try:
        for name, values in VALUE_SETS.items():
            checks.run(f"[{name}] helm lint --strict", lambda v=values: check_lint(v))
            rendered = checks.run(f"[{name}] renders", lambda v=values: render(v))
            if rendered is None:
                continue
            docs = checks.run(f"[{name}] every template renders valid YAML objects", lambda r=rendered: manifests(r))
            if docs is None:
                continue
            notes = rendered.get("ferry/templates/NOTES.txt", "")
            checks.run(f"[{name}] NOTES.txt says how to reach the API", lambda n=notes: require(
                all(s in n for s in ("port-forward", "base64 -d", "FERRY_SERVER", "FERRY_TOKEN", "ferryctl")), n))
            merged = merged_values(values)
            checks.run(f"[{name}] restricted Pod Security Standard, probes, no host access", lambda d=docs: check_pss(d))
            checks.run(f"[{name}] ferryd pods: config keys, env, mounts, GPUs", lambda d=docs, m=merged: check_ferry_pods(d, values, m))
            checks.run(f"[{name}] bundled etcd", lambda d=docs, m=merged: check_etcd(d, m))
            checks.run(f"[{name}] references and selectors", lambda d=docs, m=merged: check_references(d, m))
            checks.run(f"[{name}] NetworkPolicy", lambda d=docs, m=merged: check_network_policy(d, m))
            checks.run(f"[{name}] monitoring objects", lambda d=docs, m=merged: check_monitoring(d, m))
            d = work / name
            d.mkdir()
            for i, doc in enumerate(docs):
                (d / f"{i:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml").write_text(yaml.safe_dump(strip(doc)))
            dirs.append(d)
            views[name] = process_view(docs)
        crds = checks.run(f"kubernetes-validate --strict ({', '.join(KUBE_VERSIONS)})", lambda: check_kubernetes_validate(dirs))
        if crds:
            checks.notes.append(f"kubernetes-validate has no schema for {', '.join(crds)} (CRDs): checked by this script")
        failed = checks.run("checkov (failed checks all in CHECKOV_SKIPS)", lambda: check_checkov(work))
        if failed is not None:
            for k, reason in CHECKOV_SKIPS.items():
                status = f"{len(failed[k])} finding(s)" if k in failed else "did not fire"
                checks.notes.append(f"checkov skip {k} ({status}): {reason}")
        for label, values, expect in REFUSED:
            checks.run(f"refuses {label}", lambda n=label, v=values, e=expect: check_refused(n, v, e))
        checks.run("alert rules: promtool check and unit tests, `<query> <op> <threshold>`", check_alerts)
        checks.run("dashboard: rows, variables, datasources; every query parses (promtool)", check_dashboard)
        checks.run("dashboard: every query returns data while a job runs (promtool, synthetic series)", check_dashboard_data)
        if "defaults" in views:
            v = views["defaults"]
            checks.run("render view for process tests", lambda: require(
                bool(v["token"]) and [p["role"] for p in v["pods"]] == ["worker"], json.dumps(v)[:500]))
        # ferryd itself loads the configs (not the external-etcd one: its TLS files are not here).
        for name in ("defaults", "gpu-workers", "daemonset", "teachers"):
            if name in views:
                note = checks.run(f"[{name}] ferryd accepts the rendered configs", lambda v=views[name]: check_ferryd_accepts(v))
                if note:
                    checks.notes.append(f"ferryd [{name}]: {note}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for n in checks.notes:
        print(f"note: {n}")
    print(f"\n{len(checks.passed)} checks passed, {len(checks.failed)} failed ({time.time() - started:.0f} s)")
    if checks.failed:
        print("failed:")
        for name, msg in checks.failed:
            print(f"  {name}: {msg.splitlines()[0] if msg else ''}")
        return 1
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    try:
        values = json.loads(args.set_json) if args.set_json else {}
    except json.JSONDecodeError as e:
        fail(f"--set-json is not JSON: {e}")
    try:
        docs = manifests(render(values, args.release, args.namespace))
    except HelmError as e:
        fail(f"the chart does not render with these values: {e}")
    view = process_view(docs)
    view["release"] = args.release
    view["namespace"] = args.namespace
    json.dump(view, sys.stdout, indent=2)
    print()
    return 0


def cmd_alerts(_: argparse.Namespace) -> int:
    print(ALERTS)
    return 0


def cmd_queries(_: argparse.Namespace) -> int:
    json.dump(all_queries(), sys.stdout, indent=2)
    print()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="lint, render, validate and scan the chart; exits 1 on any failure")
    r = sub.add_parser("render", help="print what a process test needs to run the rendered ferryd pods, as JSON")
    r.add_argument("--set-json", default="", help="values overrides, as a JSON object")
    r.add_argument("--release", default="ferry", help="release name (default: ferry)")
    r.add_argument("--namespace", default="ferry", help="namespace (default: ferry)")
    sub.add_parser("alerts", help="print the path of the alert rules file (a plain Prometheus rules file)")
    sub.add_parser("queries", help="print every dashboard and alert PromQL expression, as JSON")
    args = ap.parse_args()
    return {"check": cmd_check, "render": cmd_render, "alerts": cmd_alerts, "queries": cmd_queries}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
