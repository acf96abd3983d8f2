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
import sys
import threading
import time
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from trainwarden.controller.channel_security import channel_opener
from trainwarden.controller.protocol import (
    ENV_ENDPOINT,
    ENV_RUN_DIR,
    ENV_RUN_ID,
    ENV_SYNC_EVERY,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
)
from trainwarden.controller.rundir import (
    READY_FILE,
    TOKEN_FILE,
    RunDirError,
    check_run_id,
    ensure_private_dir,
    private_opener,
    refuse_links,
    write_private,
)
from trainwarden.controller.supervise import FINAL_SCRAPE_WAIT_S
from trainwarden.policies.units import format_bytes, format_duration

log = logging.getLogger("trainwarden")

EXIT_USAGE = 2
#: The sidecar's loop: telemetry and job checks, the parent's liveness (`run`'s), once a tick.
LOOP_TICK_S = 1.0


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
    from trainwarden.controller.channel_security import token_problem

    problem = token_problem(token)
    if problem:
        raise UsageError(f"{token_file}: {problem}")
    ssl_context = _tls_context(args, host)
    if len(token) < 16:
        raise UsageError(
            f"the token in {token_file} is too short ({len(token)} characters): use at least 16 "
            "random characters, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    try:
        run_dir = ensure_private_dir(Path(args.run_dir))
        refuse_links(run_dir)
        run_id = check_run_id(args.run_id or run_dir.name)
        _log_to(run_dir / "controller.log")
        controller = Controller(run_dir, run_id, policy_file=pf, sources=default_sources())
    except RunDirError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:  # e.g. ELOOP: a symlink planted where a log goes
        raise UsageError(
            f"cannot open the run's files in {args.run_dir} ({exc}); trainwarden follows no link there: "
            "remove what is in the way, or pick a new --run-dir"
        ) from exc
    try:
        server = ChannelServer((host, port), controller, token, ssl_context=ssl_context)
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
    endpoint = f"{'https' if ssl_context else 'http'}://{host}:{server.port}"
    ready = {
        "endpoint": endpoint,
        "metrics": f"http://{args.metrics_host}:{metrics_port}/metrics",
        "pid": os.getpid(),
        "run_id": run_id,
        "nonce": args.ready_nonce,  # `run` reads only the file of the controller it started
    }
    write_private(run_dir / READY_FILE, json.dumps(ready))
    log.info(
        "controller for run %s: channel %s, metrics %s, run directory %s",
        run_id,
        endpoint,
        ready["metrics"],
        run_dir,
    )

    stop, hurry = threading.Event(), threading.Event()
    # What ends the loop's wait early: a signal, or the job saying it finished.
    wake = threading.Event()
    server.on_finished = wake.set

    def on_signal(*_: Any) -> None:
        (hurry if stop.is_set() else stop).set()  # a second signal cuts the final scrape short
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    errors = 0
    try:
        while not stop.is_set():
            try:
                if args.exit_when_finished and server.job_finished.is_set():
                    break
                controller.check_telemetry()
                if not controller.check_job() and args.exit_when_finished:
                    break
                if args.parent_pid and not _alive(args.parent_pid):
                    log.warning("parent process %d is gone; stopping so no orphan is left", args.parent_pid)
                    break
            except Exception as exc:  # out of descriptors (EMFILE), a /proc read: the loop goes on
                errors += 1
                if errors == 1 or errors % 100 == 0:
                    log.error("controller loop: %s (%d time(s)); going on", exc, errors)
            # Once a second: the checks need no more, and each wake of an idle sidecar costs CPU
            # that, on a job's own cores, comes out of training.
            wake.wait(LOOP_TICK_S)
            wake.clear()
    finally:
        # Whatever happened above, the channel stops, the summary is written, and /metrics serves
        # the final numbers (unanswered actions are counted only at close) to one more scrape.
        try:
            server.stop()
        except Exception as exc:
            log.error("stopping the channel: %s", exc)
        try:
            summary = controller.close()
            log.info("controller stopped at step %s", summary.get("step"))
            if metrics_server.await_final_scrape(args.final_scrape_wait, hurry):
                log.debug("the final numbers were scraped")
        finally:
            try:
                metrics_server.stop()
            except Exception as exc:
                log.error("stopping the metrics server: %s", exc)
    return 0


def _tls_context(args: argparse.Namespace, host: str) -> Any:
    """The channel's TLS context from --tls-cert/--tls-key (None without them); a loud warning when
    the channel or /metrics listens beyond loopback without it."""
    from trainwarden.controller.channel_security import is_loopback, server_tls_context

    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if bool(cert) != bool(key):
        raise UsageError("give both --tls-cert and --tls-key (PEM files), or neither")
    context = None
    if cert:
        try:
            context = server_tls_context(cert, key)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise UsageError(
                f"cannot use --tls-cert {cert} --tls-key {key} ({exc}); give a PEM certificate and its "
                "private key, e.g. from `openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem "
                '-out cert.pem -days 365 -subj /CN=trainwarden -addext "subjectAltName=DNS:HOST"`'
            ) from exc
    if not is_loopback(host):
        log.warning(
            "the channel listens on %s, beyond this machine: %s",
            host,
            "TLS is on (--tls-cert)"
            if context
            else "the bearer token and the job's telemetry cross the network in clear text; give "
            "--tls-cert/--tls-key (the job sets TRAINWARDEN_CA_FILE and an https endpoint), or listen on "
            "127.0.0.1 with the job in the same network namespace (a Kubernetes pod)",
        )
    if not is_loopback(args.metrics_host):
        log.warning(
            "/metrics listens on %s, beyond this machine, without authentication: anyone who reaches it "
            "reads the run's metrics; limit who can (a NetworkPolicy, a firewall), or give "
            "--metrics-host 127.0.0.1",
            args.metrics_host,
        )
    return context


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
    of printing a traceback per record; the controller goes on either way. Opened 0600, never
    through a symlink."""

    _failed = False

    def _open(self):  # type: ignore[no-untyped-def]
        return open(
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=private_opener
        )

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._failed:
            self._failed = True
            print(
                f"trainwarden: cannot write {self.baseFilename} ({sys.exc_info()[1]}); logging to stderr",
                file=sys.stderr,
                flush=True,
            )


def _log_to(path: Path) -> None:
    from trainwarden.controller.logsafe import OneLineFormatter

    handler = _QuietFileHandler(path)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


# ---- run -----------------------------------------------------------------------------------------
def _get_json(url: str, token: str, timeout: float = 2.0) -> dict[str, Any] | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        # Never through an http_proxy from the environment: the token is for the controller only.
        with channel_opener(url).open(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _fmt_bytes(n: float | None) -> str:
    return "?" if not n else format_bytes(n)


def _fmt_duration(s: float | None) -> str:
    return "?" if s is None else format_duration(s)


#: Seconds after the job started before the status line says why nothing connected
#: (TRAINWARDEN_NO_CONNECT_AFTER_S overrides it).
NO_CONNECT_AFTER_S = float(os.environ.get("TRAINWARDEN_NO_CONNECT_AFTER_S", "20"))


def no_connect_line(elapsed_s: float, run_dir: Path, attach: bool) -> str:
    """Why no job has connected yet, and how to attach: which frameworks the job imported (known
    in attach mode: the import hook writes them to the run directory)."""
    from trainwarden.controller.attach_env import imported_frameworks

    head = f"no job connected after {elapsed_s:.0f} s"
    if not attach:
        return (
            f"{head}: the job has not attached trainwarden. A script that does not call trainwarden's "
            "attach needs `trainwarden run --attach` (DeepSpeed, Accelerate, HF Trainer)"
        )
    seen = imported_frameworks(run_dir)
    if not seen:
        return f"{head}: the job has imported none of torch, deepspeed, accelerate, transformers yet"
    return (
        f"{head}: the job imported {', '.join(seen)}, and attaches at deepspeed.initialize, at "
        "accelerate.Accelerator's prepare of model and optimizer, at transformers.Trainer.train, "
        "or through trainwarden.adapters.pytorch.attach; none of these ran yet"
    )


def status_line(st: dict[str, Any]) -> str:
    """One line: step, loss, tokens/s, memory against the cap, budget left, last decision."""
    if not st.get("connected") or st.get("job_heard") is False:
        # (Before the job's first message the state is an earlier job's, on a reused run directory.)
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
    stop = st.get("stop")
    if stop and stop.get("outcome") == "ignored":
        parts.append(f"STOP IGNORED at step {stop['step']}: the job trains on outside its budget")
    elif stop:
        parts.append(f"stopped at step {stop['step']}")
    elif d:
        value = "" if d["kind"] == "stop" else f"={d['params'].get('value', '')}"
        parts.append(f"last: {d['kind']}{value} {d['outcome']} at step {d['step']}")
    parts += [f"NOTE: {n}" for n in st.get("notices") or ()]
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
    stop = summary.get("stop")
    if stop:
        what = (
            "IGNORED: the job trained on outside its budget"
            if stop.get("outcome") == "ignored"
            else "applied"
        )
        lines.insert(
            1,
            f"  stop at step {stop.get('step')} {what}"
            + (f" ({stop['detail']})" if stop.get("detail") else ""),
        )
    if summary.get("job"):
        lines.insert(1, f"  {summary['job']}")
    lines += [f"  note: {n}" for n in summary.get("notices") or ()]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command to run: trainwarden run --policy P.yaml -- python train.py ...")
    pf = _load_policy(args.policy)  # fail here, before anything starts, on a bad file
    _parse_listen(args.listen)  # a bad --listen is said here, not by the controller's log
    from trainwarden.controller.budget_end import ENV_BUDGET_END, BudgetEnd
    from trainwarden.controller.identity import new_run_id
    from trainwarden.controller.launch import DEFAULT_GRACE_S, Job
    from trainwarden.controller.supervise import ControllerStartError, Supervisor, say_on_stderr

    try:
        run_id = check_run_id(args.run_id or new_run_id())
        run_dir = ensure_private_dir(Path(args.run_dir or Path("runs") / run_id))
        refuse_links(run_dir)
        token_file = run_dir / TOKEN_FILE
        # The token lives in this 0600 file only (not in the job's environment, which every child
        # inherits), and is removed at the end.
        token = secrets.token_urlsafe(32)
        write_private(token_file, token)
    except RunDirError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot write the run directory ({exc}); pick another --run-dir") from exc
    ctl_cmd = [
        *(sys.executable, "-m", "trainwarden.controller.cli", "controller"),
        *("--run-dir", str(run_dir), "--token-file", str(token_file), "--run-id", run_id),
        *("--parent-pid", str(os.getpid())),
    ]
    if args.policy:
        ctl_cmd += ["--policy", args.policy]
    sup = Supervisor(run_dir, ctl_cmd, say_on_stderr)
    try:
        ready = sup.start(args.metrics_port, args.listen)
    except ControllerStartError as exc:
        token_file.unlink(missing_ok=True)
        raise UsageError(f"the controller did not start:\n{exc}") from exc
    except (RunDirError, OSError) as exc:
        sup.stop()
        token_file.unlink(missing_ok=True)
        raise UsageError(str(exc)) from exc
    assert sup.proc is not None
    print(
        f"trainwarden: run {run_id}\n  run directory {run_dir}\n  metrics {ready['metrics']}\n"
        f"  controller {ready['endpoint']} (pid {sup.proc.pid}, log {run_dir / 'controller.log'})",
        file=sys.stderr,
        flush=True,
    )

    env = {k: v for k, v in os.environ.items() if k != ENV_TOKEN}
    env.update(
        {
            ENV_ENDPOINT: ready["endpoint"],
            ENV_TOKEN_FILE: str(token_file),
            ENV_RUN_ID: run_id,
            ENV_RUN_DIR: str(run_dir),
        }
    )
    if pf is not None:
        env[ENV_SYNC_EVERY] = str(pf.controller.sync_every)
    end = BudgetEnd.of_policy(pf)
    if end is not None:  # the job keeps the budget's end by itself if no controller can be had
        env[ENV_BUDGET_END] = json.dumps(end.to_json())
    if getattr(args, "attach", False):
        from trainwarden.controller.attach_env import job_env

        env.update(job_env(run_dir, env))
    grace = getattr(args, "stop_grace", DEFAULT_GRACE_S)
    # The job has a session of its own: Ctrl-C, SIGINT and SIGTERM reach `run`, which passes them
    # on to the job's whole process group, and SIGKILLs it after the grace period (launch.py).
    # Installed before the job starts: a signal in between is passed on once it exists, and the job
    # starts with SIGINT at its default (a handler resets at exec; `run` started in the background
    # of a shell script inherits SIGINT ignored, and so would its job, deaf to the INT passed on).
    the_job: list[Job] = []
    early: list[int] = []
    forward = lambda sig, _f: the_job[0].forward(sig) if the_job else early.append(sig)  # noqa: E731
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        job = Job(command, env, say_on_stderr, grace, spare=lambda: {sup.proc.pid} if sup.proc else set())
    except OSError as exc:
        sup.stop()
        token_file.unlink(missing_ok=True)
        raise UsageError(f"cannot start {command[0]!r}: {exc}") from exc
    the_job.append(job)
    for sig in early:
        job.forward(sig)
    tty = sys.stderr.isatty() and not args.quiet
    last_print = 0.0
    started = time.monotonic()
    heard = False  # the job reached a controller once: a later silence is a reconnect, not an attach
    status_url = ready["endpoint"] + "/v1/status"
    while job.poll() is None:
        time.sleep(0.5)
        job.check()
        sup.check()
        if args.quiet or not sup.alive:
            continue
        now = time.monotonic()
        if tty or now - last_print >= args.status_every:
            st = _get_json(status_url, token)
            if st is not None:
                line = status_line(st)
                waited = now - started
                heard = heard or bool(st.get("job_heard", st.get("connected")))
                if not heard and waited >= NO_CONNECT_AFTER_S:
                    line = no_connect_line(waited, run_dir, bool(getattr(args, "attach", False)))
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
    job.check()  # says a signal it passed on, if the job ended before the loop could
    job.reap_leftovers()
    # The agent flushes its last telemetry at exit; give the controller a moment to take it in.
    time.sleep(0.3)
    sup.stop()
    token_file.unlink(missing_ok=True)
    if sup.restarts_total:
        print(
            f"trainwarden: the controller was restarted {sup.restarts_total} time(s) during the run"
            + ("; it could not be kept up in the end" if sup.given_up and not sup.alive else ""),
            file=sys.stderr,
        )
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
    # Through `run`'s own parser, so the demo gets every default of `trainwarden run` (a flag added
    # to `run` later cannot be missing here: the demo once broke on a new --listen).
    run_args = ["run", "--policy", policy, "--metrics-port", str(args.metrics_port), "--status-every", "5"]
    if args.run_dir:
        run_args += ["--run-dir", str(args.run_dir)]
    ns = build_parser().parse_args([*run_args, "--", *command])
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
        help="attach trainwarden to a job whose code does not mention it (an import hook on the job's "
        "PYTHONPATH): deepspeed.initialize returns trainwarden's live handle, accelerate.Accelerator "
        "is trainwarden's drop-in, every transformers.Trainer gets the trainwarden callback; plain "
        "PyTorch loops need trainwarden.adapters.pytorch.attach in the script",
    )
    r.add_argument(
        "--status-every",
        type=float,
        default=5.0,
        help="seconds between status lines when stderr is not a terminal",
    )
    r.add_argument(
        "--stop-grace",
        type=float,
        default=30.0,
        help="seconds the job has to end after SIGINT/SIGTERM (passed on to its whole process group) "
        "before it gets SIGKILL (default %(default)s)",
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
    c.add_argument(
        "--final-scrape-wait",
        type=float,
        default=FINAL_SCRAPE_WAIT_S,
        metavar="SECONDS",
        help="at exit, wait up to this long (about 1.5 scrape intervals) for Prometheus to scrape the "
        "final numbers; 0: do not wait (default %(default)s)",
    )
    c.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve the channel over TLS with this certificate (with --tls-key); for a channel that "
        "leaves the host. The job verifies it with TRAINWARDEN_CA_FILE and an https:// endpoint",
    )
    c.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    c.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by `run`: exit when it dies
    c.add_argument(
        "--ready-nonce", help=argparse.SUPPRESS
    )  # set by `run`: names this start in controller.json
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
    from trainwarden.policies.tuning import cli as tune_cli  # argparse only; Optuna is imported when it runs

    tune_cli.add_arguments(t)
    t.set_defaults(fn=tune_cli.cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    from trainwarden.controller.logsafe import OneLineFormatter

    logging.basicConfig(
        level=os.environ.get("TRAINWARDEN_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # what a job sends cannot forge log lines
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except UsageError as exc:
        print(f"trainwarden {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
