"""deploy/: the Kubernetes manifests and the Prometheus configuration hold together.

The sidecar's arguments are parsed by the real `trainwarden controller` parser, the trainer's
environment names are the protocol's, the token Secret is mounted where `--token-file` points,
the policy ConfigMap is a valid policy file, and the metrics port is the same in the container,
the pod annotations, the Service and the ServiceMonitor. prometheus.yml is checked by the real
`promtool` (Debian's prometheus package ships it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from helpers import REPO

from trainwarden.controller import protocol
from trainwarden.controller.cli import build_parser
from trainwarden.policies.loader import load_policy_file

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"


def k8s_objects() -> dict[str, dict[str, Any]]:
    """Every object of every manifest, by kind (each kind appears once); the Secret's template in
    secrets/ (kept out of the folder `kubectl apply -f deploy/k8s/` applies) included."""
    objects: dict[str, dict[str, Any]] = {}
    files = sorted(K8S.glob("*.yaml")) + sorted((K8S / "secrets").glob("*.yaml"))
    assert files, "no manifests in deploy/k8s"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["kind"] not in objects, f"{doc['kind']} twice"
            objects[doc["kind"]] = doc
    return objects


def pod_spec(objects: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod template metadata, pod spec) of the training workload (a Job or a Pod)."""
    if "Job" in objects:
        tpl = objects["Job"]["spec"]["template"]
        return tpl["metadata"], tpl["spec"]
    return objects["Pod"]["metadata"], objects["Pod"]["spec"]


def containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def arg_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def mount_of(container: dict[str, Any], spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted over `path` in the container (the deepest mount containing it)."""
    best = None
    for m in container.get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(m["mountPath"]) and (
            best is None or len(m["mountPath"]) > len(best["mountPath"])
        ):
            best = m
    assert best is not None, f"{path} is on no volume of {container['name']}"
    volume = next(v for v in spec["volumes"] if v["name"] == best["name"])
    return {"mount": best, "volume": volume, "rest": str(PurePosixPath(path).relative_to(best["mountPath"]))}


def test_manifests_parse_and_the_sidecar_args_are_the_controllers() -> None:
    objects = k8s_objects()
    assert {"Secret", "ConfigMap", "Service", "ServiceMonitor"} <= objects.keys()
    assert "Job" in objects or "Pod" in objects
    _, spec = pod_spec(objects)
    cs = containers(spec)
    sidecar, trainer = cs["trainwarden"], cs["trainer"]
    if sidecar in spec.get("initContainers", []):
        assert sidecar["restartPolicy"] == "Always", (
            "an init container is a sidecar only with restartPolicy Always"
        )

    # The real parser accepts the args, and they select the controller subcommand.
    assert sidecar["command"] == ["trainwarden"]
    env = {"POD_NAME": "gpt-train-abcde"}
    args = build_parser().parse_args([expand(a, env) for a in sidecar["args"]])
    assert args.cmd == "controller"
    assert args.listen == "127.0.0.1:7900"
    assert args.run_dir == "/runs/gpt-train-abcde" and args.policy and args.token_file
    assert args.metrics_host == "0.0.0.0", "Prometheus scrapes the pod's address, not its loopback"

    # The token: one Secret, mounted read-only in both containers, where each one reads it.
    secret = objects["Secret"]
    trainer_env = {e["name"]: e.get("value", "") for e in trainer["env"]}
    assert trainer_env[protocol.ENV_TOKEN_FILE] == args.token_file
    for container in (sidecar, trainer):
        where = mount_of(container, spec, args.token_file)
        assert where["mount"].get("readOnly") is True, container["name"]
        assert where["volume"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert where["rest"] in (secret.get("stringData") or secret.get("data") or {})

    # The policy: the ConfigMap's file, where --policy points, and valid.
    cm = objects["ConfigMap"]
    where = mount_of(sidecar, spec, args.policy)
    assert where["volume"]["configMap"]["name"] == cm["metadata"]["name"]
    assert where["rest"] in cm["data"]

    # The run directory is on a volume.
    mount_of(sidecar, spec, args.run_dir)


def test_the_trainer_env_names_are_the_protocols_and_agree_with_the_sidecar(tmp_path: Path) -> None:
    objects = k8s_objects()
    _, spec = pod_spec(objects)
    cs = containers(spec)
    sidecar, trainer = cs["trainwarden"], cs["trainer"]
    known = {v for k, v in vars(protocol).items() if k.startswith("ENV_")}
    env = {e["name"]: e for e in trainer["env"]}
    for name in env:
        if name.startswith("TRAINWARDEN_"):
            assert name in known, f"the trainer sets {name}, which trainwarden does not read"
    values = {n: e.get("value", "") for n, e in env.items()}
    args = build_parser().parse_args(sidecar["args"])
    assert values[protocol.ENV_ENDPOINT] == f"http://{args.listen}"
    assert protocol.ENV_TOKEN not in values, "the token comes from the Secret's file, not a literal"
    # The run id the job reports is the controller's (its run directory's name).
    pod_env = {"POD_NAME": "p-1"}
    assert expand(values[protocol.ENV_RUN_ID], pod_env) == Path(expand(args.run_dir, pod_env)).name

    # The policy file is valid, and the trainer's sync cadence is the policy's.
    policy = tmp_path / "policy.yaml"
    policy.write_text(objects["ConfigMap"]["data"][Path(args.policy).name])
    pf = load_policy_file(policy)
    assert int(values[protocol.ENV_SYNC_EVERY]) == pf.controller.sync_every


def test_the_metrics_port_is_the_same_everywhere() -> None:
    objects = k8s_objects()
    meta, spec = pod_spec(objects)
    sidecar = containers(spec)["trainwarden"]
    args = build_parser().parse_args(sidecar["args"])
    port = args.metrics_port
    named = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert named["metrics"] == port
    ann = meta["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == port and ann["prometheus.io/path"] == "/metrics"
    assert sidecar["startupProbe"]["httpGet"]["port"] in ("metrics", port)

    svc, sm = objects["Service"], objects["ServiceMonitor"]
    assert svc["spec"]["selector"].items() <= meta["labels"].items(), "the Service selects no training pod"
    svc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "metrics")
    assert svc_port["targetPort"] in ("metrics", port)
    assert svc_port["port"] == port
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert all(e.get("path", "/metrics") == "/metrics" for e in sm["spec"]["endpoints"])

    # prometheus.yml's static target is the controller's default metrics port.
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = [t for sc in prom["scrape_configs"] for s in sc.get("static_configs", []) for t in s["targets"]]
    default_port = (
        build_parser().parse_args(["controller", "--run-dir", "r", "--token-file", "t"]).metrics_port
    )
    assert targets == [f"127.0.0.1:{default_port}"]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        why = "promtool is not installed (Debian: apt-get install prometheus ships it)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + ": under CI=true that is a failure")
        pytest.skip(why)
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_prometheus_yml_passes_promtool() -> None:
    out = check_config(PROMETHEUS_YML)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_commented_kubernetes_example_is_valid_once_uncommented(tmp_path: Path) -> None:
    lines = PROMETHEUS_YML.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("# - job_name:"))
    uncommented = lines[:first] + [line.replace("# ", "", 1) for line in lines[first:]]
    path = tmp_path / "prometheus.yml"
    path.write_text("\n".join(uncommented) + "\n")
    config = yaml.safe_load(path.read_text())
    sd = config["scrape_configs"][-1]
    assert sd["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = sd["relabel_configs"][0]
    assert keep["action"] == "keep"
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    out = check_config(path)
    if out.returncode != 0 and "kubernetes_sd_configs not found" in out.stdout + out.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert out.returncode == 0, out.stdout + out.stderr


# ---- issue 15: the manifests as a cluster takes them, under Pod Security "restricted" ------------
#: Volume types Pod Security "restricted" allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "projected", "secret"} | {
    "persistentVolumeClaim"
}


def test_applying_the_folder_never_overwrites_the_token_secret() -> None:
    """`kubectl apply -f deploy/k8s/` (not recursive) applies what lies in the folder itself: the
    Secret's template with its placeholder lies below it, so a real token made with `kubectl
    create secret` is never replaced by the placeholder the controller refuses."""
    kinds = {
        doc["kind"]
        for path in K8S.glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    }
    assert "Secret" not in kinds
    assert (K8S / "secrets" / "secret.yaml").exists()


def test_every_manifest_passes_the_kubernetes_schema() -> None:
    """Each object against the Kubernetes API's own OpenAPI schema (kubernetes-validate), strict:
    an unknown or misspelt field fails. The ServiceMonitor is a CRD of the Prometheus operator,
    whose schema is not Kubernetes': its fields are checked above."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]' brings it)")
    version = kubernetes_validate.latest_version()
    checked = []
    for kind, obj in k8s_objects().items():
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind} {obj['metadata']['name']} is not valid Kubernetes {version}: {exc.message}")
        checked.append(kind)
    assert {"Job", "Secret", "ConfigMap", "Service", "NetworkPolicy"} <= set(checked)


def test_the_pod_passes_pod_security_restricted() -> None:
    """The fields Pod Security "restricted" checks (kubernetes.io/docs/concepts/security/
    pod-security-standards), for every container: non-root, no privilege escalation, every
    capability dropped, seccomp RuntimeDefault; and no ServiceAccount token, a bounded emptyDir."""
    _, spec = pod_spec(k8s_objects())
    check_restricted(spec)


def check_restricted(spec: dict[str, Any]) -> None:
    """Pod Security "restricted" for one pod spec (also for tests/test_deploy_multi_node.py)."""
    pod_sc = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False, "no container talks to the API server"
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for v in spec["volumes"]:
        kinds = set(v) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, f"volume {v['name']} is of a kind restricted forbids: {kinds}"
        if "emptyDir" in v:
            assert v["emptyDir"].get("sizeLimit"), f"emptyDir {v['name']} is unbounded"
    for name, c in containers(spec).items():
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert not sc.get("privileged"), name
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{name} must drop every capability"
        assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, name
        assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, f"{name} may run as root"
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), f"{name} has no seccomp profile"
        assert not c.get("ports") or all("hostPort" not in p for p in c["ports"]), name


def test_a_network_policy_admits_only_metrics_and_nothing_to_the_channel() -> None:
    objects = k8s_objects()
    meta, spec = pod_spec(objects)
    sidecar = containers(spec)["trainwarden"]
    args = build_parser().parse_args(sidecar["args"])
    channel_port = int(args.listen.rsplit(":", 1)[1])
    np_ = objects["NetworkPolicy"]["spec"]
    # It selects the training pods, and governs their ingress.
    assert np_["podSelector"]["matchLabels"].items() <= meta["labels"].items()
    assert "Ingress" in np_["policyTypes"]
    ports = [p["port"] for rule in np_["ingress"] for p in rule.get("ports", [])]
    assert ports == [args.metrics_port], "only the metrics port is admitted"
    assert channel_port not in ports and all(rule.get("from") for rule in np_["ingress"]), (
        "no rule may admit every source, or the channel"
    )
