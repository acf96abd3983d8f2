"""A real PostgreSQL server for the tests that tune one study from several processes.

Debian's `postgresql` package (scripts/test.sh installs it when CI needs it). `initdb` and
`pg_ctl` refuse to run as root, so as root the server runs as the package's `postgres` user
(`runuser`); its data directory is a fresh temporary folder, it listens on 127.0.0.1 on a free
port and on a Unix socket in that folder, and it is stopped and deleted at the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import free_port

USER = "trainwarden"
INSTALL = "apt-get install postgresql (as root), and pip install 'psycopg[binary]' (the tune extra)"


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def unavailable() -> str | None:
    """Why no PostgreSQL can be started here, or None."""
    if _bin("initdb") is None or _bin("pg_ctl") is None:
        return f"no PostgreSQL server binaries (initdb, pg_ctl): {INSTALL}"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return f"no psycopg driver (SQLAlchemy's for postgresql:// URLs): {INSTALL}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no `postgres` user to run the server as (Debian's package makes one)"
    return None


def require() -> None:
    """Skip the test where PostgreSQL cannot be started, saying why; in CI (CI=true) fail instead."""
    why = unavailable()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs PostgreSQL for the multi-worker tuning tests: {why}")
    pytest.skip(why)


@contextmanager
def postgres_server(fsync: bool = False) -> Iterator[str]:
    """A running server; yields a SQLAlchemy URL of an empty database `tune` on it. fsync off by
    default (tests: nothing to keep); a benchmark compares with it on, as a real server runs."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    assert initdb and pg_ctl
    root = Path(tempfile.mkdtemp(prefix="tw-pg-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        # The server's user must reach its folder: a fresh one, owned by it, nothing else in it.
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        root.chmod(0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8"], **run)
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=50"
        opts += "" if fsync else " -c fsync=off"
        subprocess.run(
            [
                *as_user,
                pg_ctl,
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
            **run,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr or exc.stdout}") from exc
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user=USER, dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE tune")
        yield f"postgresql://{USER}@127.0.0.1:{port}/tune"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def new_database(url: str, name: str) -> str:
    """Another empty database on the same server (a study per test, nothing shared)."""
    import psycopg

    base, _, _ = url.rpartition("/")
    with psycopg.connect(base + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"
