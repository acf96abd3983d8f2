"""The `trainwarden` command: run, controller, validate, demo, report, tune.

Every user error (a bad policy file, a bad flag, a port in use) ends in one clear message
and a non-zero exit, never a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from trainwarden.controller.protocol import ENV_ENDPOINT, ENV_RUN_DIR, ENV_RUN_ID, ENV_SYNC_EVERY, ENV_TOKEN
from trainwarden.policies.units import format_bytes, format_duration

log = logging.getLogger("trainwarden")

EXIT_USAGE = 2
#: File the controller writes once it listens: {"endpoint", "metrics", "pid"}.
READY_FILE = "controller.json"


class UsageError(Exception):
    """A mistake in how trainwarden was called; the message says how to fix it."""


# ---- validate ----------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from trainwarden.policies.validate import validate_main

    return validate_main(args.files)


# ---- controller --------------------------------------------------------------------------------
def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(
            f"--listen {text!r} is not HOST:PORT; e.g. --listen 127.0.0.1:7900 (port 0 picks one)"
        )
    return host.strip("[]"), int(port)


def _load_policy(path: str | None) -> Any:
    if path is None:
        return None
    from trainwarden.policies.loader import PolicyFileError, load_policy_file

    try:
        return load_policy_file(path)
    except PolicyFileError as exc:
        raise UsageError(
            f"the policy file is not valid:\n{exc}\n(check it with: trainwarden validate {path})"
        ) from exc


def cmd_controller(args: argparse.Namespace) -> int:
    from trainwarden.controller.exporter import serve_metrics
    from trainwarden.controller.loop import Controller
    from trainwarden.controller.server import ChannelServer
    from trainwarden.controller.sources import default_sources

    host, port = _parse_listen(args.listen)
    pf = _load_policy(args.policy)
    token_file = Path(args.token_file)
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise UsageError(
            f"--token-file {token_file} cannot be read ({exc}); write the bearer token there "
            "(e.g. from a Kubernetes Secret) and pass the same token to the job"
        ) from exc
    if len(token) < 16:
        raise UsageError(
            f"the token in {token_file} is too short ({len(token)} characters): use at least 16 "
            "random characters, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_to(run_dir / "controller.log")
    run_id = args.run_id or run_dir.name
    controller = Controller(run_dir, run_id, policy_file=pf, sources=default_sources())
    try:
        server = ChannelServer((host, port), controller, token)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc}); pick another --listen port") from exc
    try:
        metrics_server, metrics_port = serve_metrics(controller, args.metrics_host, args.metrics_port)
    except OSError as exc:
        server.server_close()
        raise UsageError(
            f"cannot serve metrics on port {args.metrics_port} ({exc}); pick another "
            "--metrics-port (0 picks a free one)"
        ) from exc
    server.start()
    endpoint = f"http://{host}:{server.port}"
    ready = {
        "endpoint": endpoint,
        "metrics": f"http://{args.metrics_host}:{metrics_port}/metrics",
        "pid": os.getpid(),
        "run_id": run_id,
    }
    (run_dir / READY_FILE).write_text(json.dumps(ready))
    log.info(
        "controller for run %s: channel %s, metrics %s, run directory %s",
        run_id,
        endpoint,
        ready["metrics"],
        run_dir,
    )

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    next_check = 0.0
    while not stop.is_set():
        if args.exit_when_finished and server.job_finished.is_set():
            break
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + 1.0
            controller.check_telemetry()
            if not controller.check_job() and args.exit_when_finished:
                break
        if args.parent_pid and not _alive(args.parent_pid):
            log.warning("parent process %d is gone; stopping so no orphan is left", args.parent_pid)
            break
        stop.wait(0.2)
    server.stop()
    metrics_server.shutdown()
    summary = controller.close()
    log.info("controller stopped at step %s", summary.get("step"))
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _QuietFileHandler(logging.FileHandler):
    """A log file that, when it cannot be written (disk full), says so once on stderr instead
    of printing a traceback per record; the controller goes on either way."""

    _failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._failed:
            self._failed = True
            print(
                f"trainwarden: cannot write {self.baseFilename} ({sys.exc_info()[1]}); logging to stderr",
                file=sys.stderr,
                flush=True,
            )


def _log_to(path: Path) -> None:
    handler = _QuietFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


# ---- run -----------------------------------------------------------------------------------------
def _get_json(url: str, token: str, timeout: float = 2.0) -> dict[str, Any] | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _fmt_bytes(n: float | None) -> str:
    return "?" if not n else format_bytes(n)


def _fmt_duration(s: float | None) -> str:
    return "?" if s is None else format_duration(s)


def status_line(st: dict[str, Any]) -> str:
    """One line: step, loss, tokens/s, memory against the cap, budget left, last decision."""
    if not st.get("connected"):
        return "waiting for the job to connect..."
    parts = [f"step {st['step']}"]
    parts.append(f"loss {st['loss']:.3f}" if st.get("loss") is not None else "loss ?")
    if st.get("nonfinite_losses"):
        parts.append(f"{st['nonfinite_losses']} NaN/inf losses")
    tps = st.get("tokens_per_second")
    parts.append(f"{tps / 1000:.1f}k tok/s" if tps else "? tok/s")
    cap = st.get("memory_cap_bytes")
    parts.append(f"mem {_fmt_bytes(st.get('memory_peak_bytes'))}" + (f"/{_fmt_bytes(cap)}" if cap else ""))
    b = st.get("budget")
    if b:
        parts.append(f"{b['name']} {b['fraction']:.0%} spent, {_fmt_duration(b.get('remaining_s'))} left")
    d = st.get("last_decision")
    if d:
        parts.append(f"last: {d['kind']}={d['params'].get('value', '')} {d['outcome']} at step {d['step']}")
    return " | ".join(parts)


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"job was killed by {name} (exit {128 - rc})"
    return f"job exited with {rc}"


def _summary_text(summary: dict[str, Any], job_rc: int, run_dir: Path) -> str:
    acts = summary.get("actions") or {}
    applied = sum(n for k, n in acts.items() if k.endswith(":applied"))
    lines = [
        f"trainwarden: {_describe_exit(job_rc)} after {_fmt_duration(summary.get('wall_time_s'))}",
        f"  steps {summary.get('step')}, tokens {summary.get('tokens')}, final loss "
        + (f"{summary['loss']:.4f}" if summary.get("loss") is not None else "?"),
        f"  memory peak {_fmt_bytes(summary.get('memory_peak_bytes'))}"
        + (
            f" against a cap of {_fmt_bytes(summary.get('memory_cap_bytes'))}"
            if summary.get("memory_cap_bytes")
            else ""
        ),
        f"  actions applied {applied}"
        + (f" ({', '.join(f'{k} x{n}' for k, n in sorted(acts.items()))})" if acts else ""),
        f"  configuration at the end: {json.dumps(summary.get('config') or {})}",
        f"  run directory {run_dir} (decisions.jsonl, telemetry.jsonl, summary.json)",
    ]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command to run: trainwarden run --policy P.yaml -- python train.py ...")
    pf = _load_policy(args.policy)  # fail here, before anything starts, on a bad file
    _parse_listen(args.listen)  # a bad --listen is said here, not by the controller's log
    from trainwarden.adapters.connect import new_run_id

    run_id = args.run_id or new_run_id()
    run_dir = Path(args.run_dir or Path("runs") / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    token_file = run_dir / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    ctl_cmd = [
        sys.executable,
        "-m",
        "trainwarden.controller.cli",
        "controller",
        "--listen",
        args.listen,
        "--metrics-port",
        str(args.metrics_port),
        "--run-dir",
        str(run_dir),
        "--token-file",
        str(token_file),
        "--run-id",
        run_id,
        "--parent-pid",
        str(os.getpid()),
    ]
    if args.policy:
        ctl_cmd += ["--policy", args.policy]
    ctl_log = open(run_dir / "controller.stderr", "w")  # noqa: SIM115  (held by the child)
    ctl = subprocess.Popen(ctl_cmd, stdout=ctl_log, stderr=subprocess.STDOUT, start_new_session=True)
    ready_path = run_dir / READY_FILE
    deadline = time.monotonic() + 30
    while not ready_path.exists():
        if ctl.poll() is not None or time.monotonic() > deadline:
            ctl.kill()
            tail = (run_dir / "controller.stderr").read_text()[-2000:]
            raise UsageError(f"the controller did not start:\n{tail}")
        time.sleep(0.05)
    ready = json.loads(ready_path.read_text())
    print(
        f"trainwarden: run {run_id}\n  run directory {run_dir}\n  metrics {ready['metrics']}\n"
        f"  controller {ready['endpoint']} (pid {ctl.pid}, log {run_dir / 'controller.log'})",
        file=sys.stderr,
        flush=True,
    )

    env = dict(os.environ)
    env.update(
        {ENV_ENDPOINT: ready["endpoint"], ENV_TOKEN: token, ENV_RUN_ID: run_id, ENV_RUN_DIR: str(run_dir)}
    )
    if pf is not None:
        env[ENV_SYNC_EVERY] = str(pf.controller.sync_every)
    if getattr(args, "attach", False):
        from trainwarden.adapters.attach_hook import job_env

        env.update(job_env(run_dir, env))
    try:
        job = subprocess.Popen(command, env=env)
    except OSError as exc:
        _stop_controller(ctl)
        raise UsageError(f"cannot start {command[0]!r}: {exc}") from exc

    # Ctrl-C reaches the job through the terminal; we wait for it to finish its own way.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: job.send_signal(signal.SIGTERM))
    tty = sys.stderr.isatty() and not args.quiet
    last_print = 0.0
    status_url = ready["endpoint"] + "/v1/status"
    while job.poll() is None:
        time.sleep(0.5)
        if args.quiet:
            continue
        now = time.monotonic()
        if tty or now - last_print >= args.status_every:
            st = _get_json(status_url, token)
            if st is not None:
                line = status_line(st)
                if tty:
                    print(
                        "\r\033[K" + line[: os.get_terminal_size(sys.stderr.fileno()).columns - 1],
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    print("trainwarden: " + line, file=sys.stderr, flush=True)
            last_print = now
    rc = job.returncode
    if tty:
        print(file=sys.stderr)
    # The agent flushes its last telemetry at exit; give the controller a moment to take it in.
    time.sleep(0.3)
    _stop_controller(ctl)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        print(_summary_text(summary, rc, run_dir), file=sys.stderr, flush=True)
    else:
        print(
            f"trainwarden: {_describe_exit(rc)}; the controller wrote no summary "
            f"(see {run_dir / 'controller.log'})",
            file=sys.stderr,
        )
    return rc if rc >= 0 else 128 - rc


def _stop_controller(ctl: subprocess.Popen[bytes]) -> None:
    if ctl.poll() is None:
        ctl.terminate()
        try:
            ctl.wait(10)
        except subprocess.TimeoutExpired:
            ctl.kill()
            ctl.wait()


# ---- demo ----------------------------------------------------------------------------------------
def demo_policy_path(quick: bool = False) -> str:
    name = "demo_quick.yaml" if quick else "demo.yaml"
    return str(resources.files("trainwarden.policies") / "examples" / name)


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo: the plain-PyTorch GPT under a micro-batch cap, or with `--deepspeed` the same GPT
    on two CPU ranks under DeepSpeed, where the memory policy switches the ZeRO stage live."""
    if not getattr(args, "deepspeed", False):
        command = [sys.executable, "-m", "trainwarden.examples.train_gpt"] + (
            ["--quick"] if args.quick else []
        )
        policy = demo_policy_path(args.quick)
        what = "a small GPT on the Python standard library's source and its reference text"
    else:
        # torchrun's --standalone picks a free rendezvous port on this host: demos never collide.
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "trainwarden.examples.train_gpt_deepspeed",
        ] + (["--quick"] if args.quick else [])
        policy = str(resources.files("trainwarden.policies") / "examples" / "deepspeed_demo.yaml")
        what = (
            "two CPU ranks train a 28.6M-parameter GPT under DeepSpeed ZeRO 0; when a rank's peak "
            "RSS crosses the\n  policy's mark, the memory policy switches both ranks' ZeRO stage "
            "in place, mid-run"
        )
        # For the job (inherited through `run`); a user's own settings win. One thread per rank: two
        # ranks on a two-core machine. glibc's mmap threshold at 64 KiB: otherwise freed tensors stay
        # resident (glibc raises the threshold up to 32 MiB as large blocks are freed) and a switched
        # engine measured 100-200 MiB above a fresh one, more than a ZeRO stage saves on a CPU.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ns = argparse.Namespace(
        policy=policy,
        command=command,
        run_dir=args.run_dir,
        run_id=None,
        metrics_port=args.metrics_port,
        quiet=False,
        status_every=5.0,
    )
    print(f"trainwarden demo: {what},\n  under the budget policy {ns.policy}", file=sys.stderr)
    return cmd_run(ns)


# ---- report --------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from trainwarden.controller.report import ReportError, write_report

    try:
        rep = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except ReportError as exc:
        raise UsageError(str(exc)) from exc
    print(f"trainwarden report: {rep.html}", file=sys.stderr)
    for path in rep.images.values():
        print(f"  {path}", file=sys.stderr)
    return 0


# ---- main ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainwarden", description="Keep a live training job inside its budget.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    v = sub.add_parser("validate", help="check policy files")
    v.add_argument("files", nargs="+", metavar="POLICY.yaml")
    v.set_defaults(fn=cmd_validate)

    r = sub.add_parser("run", help="run a training command under a sidecar controller")
    r.add_argument("--policy", help="budget policy file (YAML); without one the controller only observes")
    r.add_argument("--run-dir", help="where logs go (default runs/RUN_ID)")
    r.add_argument("--run-id", help="name of the run (default: time and a random suffix)")
    r.add_argument("--metrics-port", type=int, default=0, help="port for /metrics (default: a free one)")
    r.add_argument(
        "--listen",
        default="127.0.0.1:0",
        help="HOST:PORT for the controller's channel (default %(default)s: loopback, a free port); "
        "for a job on several hosts, an address the node holding global rank 0 reaches, e.g. 0.0.0.0:7900 "
        "(the bearer token is in RUN_DIR/token: give it to the other nodes as TRAINWARDEN_TOKEN_FILE)",
    )
    r.add_argument("--quiet", action="store_true", help="no status line")
    r.add_argument(
        "--attach",
        action="store_true",
        help="make deepspeed.initialize in the job return trainwarden's live handle, with no change "
        "to the job's code (an import hook on the job's PYTHONPATH)",
    )
    r.add_argument(
        "--status-every",
        type=float,
        default=5.0,
        help="seconds between status lines when stderr is not a terminal",
    )
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- then the usual launch command")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("controller", help="run the sidecar controller alone, for a job launched elsewhere")
    c.add_argument("--policy", help="budget policy file (YAML)")
    c.add_argument(
        "--listen", default="127.0.0.1:7900", help="HOST:PORT for the channel (default %(default)s)"
    )
    c.add_argument("--metrics-port", type=int, default=9464, help="port for /metrics (default %(default)s)")
    c.add_argument("--metrics-host", default="127.0.0.1", help="address for /metrics (default %(default)s)")
    c.add_argument("--run-dir", required=True, help="where decisions.jsonl and telemetry.jsonl go")
    c.add_argument("--token-file", required=True, help="file holding the bearer token the job must present")
    c.add_argument("--run-id", help="name of the run (default: the run directory's name)")
    c.add_argument("--exit-when-finished", action="store_true", help="exit when the job says it has finished")
    c.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by `run`: exit when it dies
    c.set_defaults(fn=cmd_controller)

    d = sub.add_parser("demo", help="train a small GPT on this machine under a budget policy, live")
    d.add_argument("--quick", action="store_true", help="a shorter run (under two minutes)")
    d.add_argument(
        "--deepspeed",
        action="store_true",
        help="two CPU ranks under DeepSpeed (torchrun, gloo): the memory policy switches the ZeRO stage live",
    )
    d.add_argument("--run-dir", help="where logs go (default runs/RUN_ID)")
    d.add_argument("--metrics-port", type=int, default=0, help="port for /metrics (default: a free one)")
    d.set_defaults(fn=cmd_demo)

    rp = sub.add_parser("report", help="plots and an HTML page of a run, finished or running")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (where telemetry.jsonl is)")
    rp.add_argument("--out", metavar="DIR", help="where the report goes (default RUN_DIR/report)")
    rp.set_defaults(fn=cmd_report)

    t = sub.add_parser(
        "tune",
        help="tune a policy's parameters with Optuna, on recorded runs (--trace) or short real runs (-- CMD)",
    )
    from trainwarden.policies import tune_cli  # argparse only; Optuna is imported when it runs

    tune_cli.add_arguments(t)
    t.set_defaults(fn=tune_cli.cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("TRAINWARDEN_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except UsageError as exc:
        print(f"trainwarden {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
