"""deploy/k8s/multi-node/: one controller Deployment + Service for an Indexed Job of several pods.

The manifests as a cluster takes them (the Kubernetes schema, Pod Security "restricted"), and as
they fit together: the controller's args are the real `trainwarden controller` parser's, the rank
pods' environment names are trainwarden's, their endpoint names the controller's Service and its
port leads to the channel's --listen port, the Secrets' keys are the files both sides read, the
torchrun command parses with torchrun's own parser and its rendezvous address is pod 0's name
under the headless Service, and the NetworkPolicies admit exactly the job's pods to the channel
and Prometheus to /metrics. Then the wiring runs: the controller container's command on this
machine (its volumes made in a temporary folder, as the kubelet would mount them), and two
"pods" of the Job (torchrun, one node each, a real two-rank job) with the pods' environment,
the Service's name standing for 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from helpers import REPO, TRAINWARDEN, free_port, job_env, scrape, wait_for
from test_deploy_files import check_restricted, containers, expand, mount_of

from trainwarden.controller import channel_security, protocol
from trainwarden.controller.cli import build_parser
from trainwarden.controller.runlog import read_jsonl
from trainwarden.policies.loader import load_policy_file

MULTI = REPO / "deploy" / "k8s" / "multi-node"
JOB = REPO / "tests" / "jobs" / "two_rank_job.py"
#: Names the rank pods may set: the protocol's, and the channel's TLS and proxy settings.
TRAINWARDEN_ENV = {v for k, v in vars(protocol).items() if k.startswith("ENV_")} | {
    v for k, v in vars(channel_security).items() if k.startswith("ENV_")
}
#: The keys a Secret of type kubernetes.io/tls holds (the API server requires both).
TLS_KEYS = {"tls.crt", "tls.key"}
#: Where the policies are applied, and the namespace they name for Prometheus.
NAMESPACE, MONITORING = "training", "monitoring"

Objects = dict[tuple[str, str], dict[str, Any]]


def objects(folder: Path = MULTI) -> Objects:
    """Every object of every manifest under the folder (secrets/ included), by (kind, name)."""
    out: Objects = {}
    files = sorted(folder.rglob("*.yaml"))
    assert files, f"no manifests in {folder}"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{key} twice"
            out[key] = doc
    return out


def one(objs: Objects, kind: str, **labels: str) -> dict[str, Any]:
    found = [
        o
        for (k, _), o in objs.items()
        if k == kind and labels.items() <= o["metadata"].get("labels", {}).items()
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects labelled {labels}"
    return found[0]


def controller_deployment(objs: Objects) -> dict[str, Any]:
    return one(objs, "Deployment", **{"app.kubernetes.io/component": "controller"})


def training_job(objs: Objects) -> dict[str, Any]:
    return one(objs, "Job", **{"app.kubernetes.io/component": "training"})


def template(workload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tpl = workload["spec"]["template"]
    return tpl["metadata"], tpl["spec"]


def controller_container(objs: Objects) -> tuple[dict[str, Any], dict[str, Any]]:
    _, spec = template(controller_deployment(objs))
    cs = containers(spec)
    assert list(cs) == ["trainwarden"], "the controller's pod runs the controller alone"
    return cs["trainwarden"], spec


def trainer_container(objs: Objects) -> tuple[dict[str, Any], dict[str, Any]]:
    _, spec = template(training_job(objs))
    cs = containers(spec)
    assert list(cs) == ["trainer"], "a rank pod runs no controller: only the trainer"
    return cs["trainer"], spec


def controller_args(objs: Objects) -> Any:
    container, _ = controller_container(objs)
    assert container["command"] == ["trainwarden"]
    args = build_parser().parse_args(container["args"])
    assert args.cmd == "controller"
    return args


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def torchrun_args(trainer: dict[str, Any], env: dict[str, str]) -> Any:
    from torch.distributed.run import get_args_parser

    assert trainer["command"] == ["torchrun"]
    return get_args_parser().parse_args([expand(a, env) for a in trainer["args"]])


def service_for(objs: Objects, host: str) -> dict[str, Any]:
    """The Service a short DNS name (`name` or `name.namespace...`) names."""
    name = host.split(".")[0]
    assert ("Service", name) in objs, f"{host} names no Service of the manifests"
    return objs[("Service", name)]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def port_of(container: dict[str, Any], target: int | str) -> int:
    """A Service's targetPort (a number or a port's name) as the container's port number."""
    if isinstance(target, int):
        return target
    return next(p["containerPort"] for p in container["ports"] if p["name"] == target)


def secret_file(objs: Objects, container: dict[str, Any], spec: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in the container: the mounted Secret's key, through
    the volume's `items` when it names them (then only those keys are files)."""
    where = mount_of(container, spec, path)
    assert where["mount"].get("readOnly") is True, f"{path} is on a writable mount"
    source = where["volume"]["secret"]
    name = source["secretName"]
    items = {i["path"]: i["key"] for i in source.get("items", [])}
    key = items[where["rest"]] if items else where["rest"]
    secret = objs[("Secret", name)]
    assert key in (secret.get("stringData") or secret.get("data") or {}), f"{name} has no key {key}"
    return name, key


# ---- the manifests as a cluster takes them ----------------------------------------------------------
def test_every_manifest_passes_the_kubernetes_schema() -> None:
    """Each object against the Kubernetes API's own OpenAPI schema, strict (an unknown or misspelt
    field fails); the ServiceMonitor is the Prometheus operator's CRD, checked below."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]' brings it)")
    version = kubernetes_validate.latest_version()
    checked = []
    for (kind, name), obj in objects().items():
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind} {name} is not valid Kubernetes {version}: {exc.message}")
        checked.append(kind)
    assert {"Deployment", "Job", "Service", "Secret", "ConfigMap", "NetworkPolicy"} <= set(checked)
    assert "PersistentVolumeClaim" in checked


def test_every_pod_passes_pod_security_restricted() -> None:
    objs = objects()
    for workload in (controller_deployment(objs), training_job(objs)):
        _, spec = template(workload)
        check_restricted(spec)


def test_the_secret_templates_are_not_applied_with_the_folder() -> None:
    """`kubectl apply -f deploy/k8s/multi-node/` reads that folder's files only: a placeholder
    Secret there would overwrite the real one made with `kubectl create secret`."""
    top = [doc["kind"] for p in MULTI.glob("*.yaml") for doc in yaml.safe_load_all(p.read_text()) if doc]
    assert "Secret" not in top
    assert {k for k, _ in objects()} >= {"Secret"}


# ---- the controller ---------------------------------------------------------------------------------
def test_one_controller_with_the_real_parsers_args(tmp_path: Path) -> None:
    objs = objects()
    deployment = controller_deployment(objs)
    # One controller per run, and never two at once (a rolling update overlaps old and new).
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    meta, spec = template(deployment)
    assert selects(deployment["spec"]["selector"]["matchLabels"], meta["labels"])
    container, _ = controller_container(objs)
    args = controller_args(objs)
    host, port = args.listen.rsplit(":", 1)
    assert host == "0.0.0.0" and int(port) > 0, "the rank pods reach the channel on the pod's address"
    assert args.metrics_host == "0.0.0.0", "Prometheus scrapes the pod's address"
    assert args.tls_cert and args.tls_key, "a channel beyond loopback is served over TLS"

    # The token and the TLS pair: files of the Secrets, mounted read-only.
    token_secret, key = secret_file(objs, container, spec, args.token_file)
    assert objs[("Secret", token_secret)]["type"] == "Opaque" and key == "token"
    cert_secret, cert_key = secret_file(objs, container, spec, args.tls_cert)
    key_secret, key_key = secret_file(objs, container, spec, args.tls_key)
    assert cert_secret == key_secret and objs[("Secret", cert_secret)]["type"] == "kubernetes.io/tls"
    assert {cert_key, key_key} == TLS_KEYS

    # The policy: the ConfigMap's file, where --policy points, and a valid policy.
    where = mount_of(container, spec, args.policy)
    cm = objs[("ConfigMap", where["volume"]["configMap"]["name"])]
    (tmp_path / "policy.yaml").write_text(cm["data"][where["rest"]])
    load_policy_file(tmp_path / "policy.yaml")

    # The run directory is on the claim, so that a controller started again continues the run.
    where = mount_of(container, spec, args.run_dir)
    assert where["mount"].get("readOnly") is not True
    claim = where["volume"]["persistentVolumeClaim"]["claimName"]
    assert objs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_metrics_port_is_the_same_everywhere() -> None:
    objs = objects()
    container, _ = controller_container(objs)
    args = controller_args(objs)
    meta, _ = template(controller_deployment(objs))
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["metrics"] == args.metrics_port
    assert named["channel"] == int(args.listen.rsplit(":", 1)[1])
    ann = meta["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == args.metrics_port
    for probe in ("startupProbe", "readinessProbe"):
        assert port_of(container, container[probe]["httpGet"]["port"]) == args.metrics_port, probe

    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svcs = [
        o
        for (k, _), o in objs.items()
        if k == "Service" and selects(sm["spec"]["selector"]["matchLabels"], o["metadata"]["labels"])
    ]
    assert len(svcs) == 1, "the ServiceMonitor selects one Service: the controller's"
    svc = svcs[0]
    assert selects(svc["spec"]["selector"], meta["labels"])
    [endpoint] = sm["spec"]["endpoints"]
    svc_port = next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])
    assert port_of(container, svc_port["targetPort"]) == args.metrics_port
    assert endpoint.get("path", "/metrics") == "/metrics"


# ---- the rank pods ----------------------------------------------------------------------------------
def test_the_rank_pods_reach_the_controller_by_its_service() -> None:
    objs = objects()
    trainer, spec = trainer_container(objs)
    controller, cspec = controller_container(objs)
    args = controller_args(objs)
    env = env_values(trainer)
    for name in env:
        if name.startswith("TRAINWARDEN_"):
            assert name in TRAINWARDEN_ENV, f"the rank pods set {name}, which trainwarden does not read"
    assert protocol.ENV_TOKEN not in env, "the token comes from the Secret's file, not a literal"
    assert not ({protocol.ENV_POLICY, protocol.ENV_RUN_DIR, protocol.ENV_DISABLE} & env.keys()), (
        "the rank pods embed no controller and keep trainwarden on"
    )

    # TRAINWARDEN_ENDPOINT: the controller's Service, whose port leads to the channel's --listen.
    url = urlsplit(env[protocol.ENV_ENDPOINT])
    assert url.scheme == ("https" if args.tls_cert else "http")
    svc = service_for(objs, url.hostname or "")
    meta, _ = template(controller_deployment(objs))
    assert selects(svc["spec"]["selector"], meta["labels"]), "the Service selects the controller's pod"
    svc_port = next(p for p in svc["spec"]["ports"] if p["port"] == url.port)
    assert port_of(controller, svc_port["targetPort"]) == int(args.listen.rsplit(":", 1)[1])
    assert svc["spec"].get("clusterIP") != "None", "one stable address, whichever pod serves"

    # The token, and the CA that verifies the controller: the same Secrets the controller reads.
    assert secret_file(objs, trainer, spec, env[protocol.ENV_TOKEN_FILE]) == secret_file(
        objs, controller, cspec, args.token_file
    )
    ca_secret, ca_key = secret_file(objs, trainer, spec, env[channel_security.ENV_CA_FILE])
    cert_secret, cert_key = secret_file(objs, controller, cspec, args.tls_cert)
    assert (ca_secret, ca_key) == (cert_secret, cert_key), "the rank pods trust the controller's certificate"
    ca_volume = mount_of(trainer, spec, env[channel_security.ENV_CA_FILE])["volume"]
    assert [i["key"] for i in ca_volume["secret"]["items"]] == ["tls.crt"], "the private key stays out"

    # The run id is the controller's; the sync cadence is its policy's.
    assert env[protocol.ENV_RUN_ID] == PurePosixPath(args.run_dir).name
    cm = objs[("ConfigMap", mount_of(controller, cspec, args.policy)["volume"]["configMap"]["name"])]
    policy = yaml.safe_load(cm["data"][PurePosixPath(args.policy).name])
    assert int(env[protocol.ENV_SYNC_EVERY]) == policy["controller"]["sync_every"]


def test_the_job_is_an_indexed_job_running_torchrun_with_c10d() -> None:
    objs = objects()
    job = training_job(objs)
    trainer, spec = trainer_container(objs)
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes, "every node at once: the rendezvous waits for them all"
    # The completion index reaches $(JOB_COMPLETION_INDEX) from the pod's own annotation.
    index = next(e for e in trainer["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    for i in range(nodes):
        run = torchrun_args(trainer, {"JOB_COMPLETION_INDEX": str(i)})
        assert run.nnodes == str(nodes) and run.node_rank == i
    assert run.rdzv_backend == "c10d" and run.rdzv_id
    assert Path(run.training_script).name == "train.py"
    gpus = int(trainer["resources"]["limits"]["nvidia.com/gpu"])
    assert run.nproc_per_node == str(gpus), "one process per GPU of the pod"

    # The rendezvous is pod 0's DNS name under the headless Service the pods' subdomain names.
    host, port = run.rdzv_endpoint.rsplit(":", 1)
    pod0, subdomain = host.split(".", 1)
    assert pod0 == f"{job['metadata']['name']}-0", "an Indexed Job's pod i is named <job>-<i>"
    assert subdomain == spec["subdomain"]
    headless = objs[("Service", subdomain)]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    meta, _ = template(job)
    assert selects(headless["spec"]["selector"], meta["labels"])
    [rdzv] = headless["spec"]["ports"]
    assert rdzv["port"] == int(port) and port_of(trainer, rdzv["targetPort"]) == int(port)


# ---- the network policies ---------------------------------------------------------------------------
def admitted(
    policies: list[dict[str, Any]], target: dict[str, str], source: tuple[str, dict[str, str]], port: int
) -> bool:
    """NetworkPolicy ingress semantics, for policies applied in NAMESPACE: a pod no policy selects
    takes everything; a selected one takes what some rule of a policy selecting it admits."""
    ns, labels = source
    ns_labels = {"kubernetes.io/metadata.name": ns}
    governing = [p["spec"] for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], target)]
    if not governing:
        return True

    def peer_ok(peer: dict[str, Any]) -> bool:
        nsel, psel = peer.get("namespaceSelector"), peer.get("podSelector")
        ns_ok = selects(nsel.get("matchLabels", {}), ns_labels) if nsel is not None else ns == NAMESPACE
        return ns_ok and (psel is None or selects(psel.get("matchLabels", {}), labels))

    for p in governing:
        assert p["policyTypes"] == ["Ingress"]
        for rule in p.get("ingress", []):
            from_ok = "from" not in rule or any(peer_ok(peer) for peer in rule["from"])
            port_ok = "ports" not in rule or any(r["port"] == port for r in rule["ports"])
            if from_ok and port_ok:
                return True
    return False


def test_the_network_policies_admit_exactly_what_they_say() -> None:
    objs = objects()
    policies = [o for (k, _), o in objs.items() if k == "NetworkPolicy"]
    args = controller_args(objs)
    channel, metrics = int(args.listen.rsplit(":", 1)[1]), args.metrics_port
    rdzv = int(
        torchrun_args(trainer_container(objs)[0], {"JOB_COMPLETION_INDEX": "0"}).rdzv_endpoint.rsplit(":", 1)[
            1
        ]
    )
    controller = template(controller_deployment(objs))[0]["labels"]
    rank = template(training_job(objs))[0]["labels"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    sources = {
        "rank pod": (NAMESPACE, rank),
        "controller": (NAMESPACE, controller),
        "prometheus": (MONITORING, prometheus),
        "prometheus elsewhere": (NAMESPACE, prometheus),
        "other pod": (NAMESPACE, {"app": "web"}),
        "other namespace": ("default", rank),
    }
    want = {
        # (target, source, port) admitted; every other combination refused.
        ("controller", "rank pod", channel),
        ("controller", "prometheus", metrics),
        *(("rank pod", "rank pod", p) for p in (channel, metrics, rdzv, 12345)),
    }
    got = {
        (target, source, port)
        for target, labels in (("controller", controller), ("rank pod", rank))
        for source, src in sources.items()
        for port in (channel, metrics, rdzv, 12345)
        if admitted(policies, labels, src, port)
    }
    assert got == want


# ---- the wiring, run on this machine ----------------------------------------------------------------
def self_signed(directory: Path, *names: str) -> tuple[bytes, bytes]:
    """A certificate and key as secrets/secrets.yaml says to make them, for these DNS names and
    127.0.0.1 (where the Service's name points on this machine)."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl CLI to make the controller's certificate")
    san = ",".join([*(f"DNS:{n}" for n in names), "IP:127.0.0.1"])
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert)),
            *("-subj", f"/CN={names[0]}", "-addext", f"subjectAltName={san}"),
        ],
        check=True,
        capture_output=True,
    )
    return cert.read_bytes(), key.read_bytes()


def mount_volumes(
    objs: Objects,
    container: dict[str, Any],
    spec: dict[str, Any],
    root: Path,
    secret_data: dict[str, dict[str, bytes]],
) -> dict[str, Path]:
    """The container's volumes as the kubelet mounts them, each in a folder under `root`: a
    mountPath -> local folder map. Secrets hold `secret_data` (the real values `kubectl create
    secret` would put there in place of the templates' placeholders)."""
    where: dict[str, Path] = {}
    for m in container.get("volumeMounts", []):
        volume = next(v for v in spec["volumes"] if v["name"] == m["name"])
        local = root / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            data = secret_data[volume["secret"]["secretName"]]
            items = {i["key"]: i["path"] for i in volume["secret"].get("items", [])} or {k: k for k in data}
            for key, path in items.items():
                (local / path).write_bytes(data[key])
                (local / path).chmod(0o440)
        elif "configMap" in volume:
            for key, text in objs[("ConfigMap", volume["configMap"]["name"])]["data"].items():
                (local / key).write_text(text)
        where[m["mountPath"]] = local
    return where


def on_this_machine(value: str, mounts: dict[str, Path]) -> str:
    """A path in the container as the path of its volume's folder here (deepest mount first)."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if PurePosixPath(value).is_relative_to(mount_path):
            return str(mounts[mount_path] / PurePosixPath(value).relative_to(mount_path))
    return value


@pytest.mark.slow
def test_the_manifests_wiring_runs_a_real_two_node_job(tmp_path: Path) -> None:
    objs = objects()
    controller, cspec = controller_container(objs)
    trainer, spec = trainer_container(objs)
    args = controller_args(objs)
    env = env_values(trainer)
    service = service_for(objs, urlsplit(env[protocol.ENV_ENDPOINT]).hostname or "")["metadata"]["name"]

    # The Secrets, made as secrets/secrets.yaml says (a random token, a certificate for the Service).
    cert, key = self_signed(tmp_path, service, f"{service}.{NAMESPACE}.svc")
    token = secrets.token_urlsafe(32)
    cert_secret, _ = secret_file(objs, controller, cspec, args.tls_cert)
    token_secret, _ = secret_file(objs, controller, cspec, args.token_file)
    data = {token_secret: {"token": token.encode()}, cert_secret: {"tls.crt": cert, "tls.key": key}}

    # The controller container's command, its paths on its volumes here, its ports free ones on
    # 127.0.0.1 (the Service's name stands for 127.0.0.1 below).
    mounts = mount_volumes(objs, controller, cspec, tmp_path / "controller", data)
    channel_port, metrics_port = free_port(), free_port()
    local_args = [on_this_machine(a, mounts) for a in controller["args"]]
    local_args[local_args.index("--listen") + 1] = f"127.0.0.1:{channel_port}"
    local_args[local_args.index("--metrics-host") + 1] = "127.0.0.1"
    local_args[local_args.index("--metrics-port") + 1] = str(metrics_port)
    run_dir = Path(on_this_machine(args.run_dir, mounts))
    log = open(tmp_path / "controller.out", "w")  # noqa: SIM115 - held by the child
    ctl = subprocess.Popen([*TRAINWARDEN, *local_args], env=job_env(), stdout=log, stderr=subprocess.STDOUT)
    pods: list[subprocess.Popen[bytes]] = []
    try:
        assert wait_for(lambda: (run_dir / "controller.json").exists() or ctl.poll() is not None, 60)
        assert ctl.poll() is None, (tmp_path / "controller.out").read_text()
        assert json.loads((run_dir / "controller.json").read_text())["endpoint"] == (
            f"https://127.0.0.1:{channel_port}"
        )

        # Two pods of the Indexed Job: torchrun with the manifest's args (one CPU rank per node,
        # the rendezvous on 127.0.0.1, the training script tests/jobs/two_rank_job.py) and the
        # pods' environment, the Service's name resolved to 127.0.0.1.
        rdzv_port = free_port()
        logs = tmp_path / "ranks"
        logs.mkdir()
        for index in range(2):
            pod = tmp_path / f"pod{index}"
            pod_mounts = mount_volumes(objs, trainer, spec, pod / "volumes", data)
            pod_env = {
                n: on_this_machine(v, pod_mounts) for n, v in env.items() if n != "JOB_COMPLETION_INDEX"
            }
            pod_env["JOB_COMPLETION_INDEX"] = str(index)
            pod_env[protocol.ENV_ENDPOINT] = pod_env[protocol.ENV_ENDPOINT].replace(
                f"//{service}:{urlsplit(env[protocol.ENV_ENDPOINT]).port}", f"//127.0.0.1:{channel_port}"
            )
            run_args = [expand(a, pod_env) for a in trainer["args"]]
            run_args[run_args.index("--nproc-per-node") + 1] = "1"
            run_args[run_args.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{rdzv_port}"
            script = run_args.index("train.py")
            run_args[script:] = [
                *(str(JOB), "--log-dir", str(logs), "--steps", "40", "--timeout", "60"),
                # Where rank 0 would embed a controller if it ignored the endpoint: it must not.
                *("--policy", on_this_machine(args.policy, mounts), "--run-dir", str(pod / "own-run")),
            ]
            out = open(pod / "torchrun.out", "w")  # noqa: SIM115 - held by the child
            pods.append(
                subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", *run_args],
                    env=job_env(**pod_env),
                    cwd=pod,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        for index, p in enumerate(pods):
            assert p.wait(240) == 0, (tmp_path / f"pod{index}" / "torchrun.out").read_text()[-3000:]
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics") or {}
        assert samples.get(("trainwarden_step", (("run", "gpt-train"),))) == 40, sorted(samples)[:20]
        # The memory of the rank on the other node reached /metrics too, through rank 0.
        ranks = {
            dict(labels).get("rank")
            for (name, labels), value in samples.items()
            if name == "trainwarden_device_memory_peak_bytes" and value > 0
        }
        assert ranks == {"0", "1"}, ranks
    finally:
        for p in pods:
            p.kill()
        ctl.send_signal(signal.SIGTERM)
        rc = ctl.wait(30)
        log.close()
    assert rc == 0, (tmp_path / "controller.out").read_text()

    # One controller, reached once by the job's global rank 0, which had two ranks on two nodes.
    rows = list(read_jsonl(run_dir / "telemetry.jsonl"))
    hellos = [r for r in rows if r["event"] == "hello"]
    assert len(hellos) == 1, hellos
    assert hellos[0]["shape"]["world_size"] == 2 and hellos[0]["shape"]["run_id"] == "gpt-train"
    assert max(r["step"] for r in rows if r["event"] == "step") == 40
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 40
    # Every rank took the policy's cadence from the pods' environment; no pod started a controller.
    for rank in (0, 1):
        attach = json.loads((logs / f"rank{rank}.jsonl").read_text().splitlines()[0])
        assert attach == {"event": "attach", "rank": rank, "sync_every": 8}
    for index in range(2):
        pod = tmp_path / f"pod{index}"
        assert not (pod / "own-run").exists() and not (pod / "runs").exists(), os.listdir(pod)
