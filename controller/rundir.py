"""The run directory, kept private: created 0700, files 0600, never a symlink followed.

A run directory holds the channel's bearer token and the run's logs. Whoever can plant a file
there (a shared /tmp, a reused directory) must not be able to make trainwarden write through a
symlink onto another file, read a token meant for them, or hand the job a stale endpoint. So:
the directory is made 0700 and refused when someone else owns it or it is a link; every file
trainwarden writes there is opened with O_NOFOLLOW (and O_EXCL where it is created anew) and
mode 0600; the controller's endpoint file (controller.json) is written under a fresh name and
renamed into place, and read back only when it names the pid and the nonce of this start.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import IO, Any

#: File the controller writes once it listens: {"endpoint", "metrics", "pid", "nonce", "run_id"}.
READY_FILE = "controller.json"
TOKEN_FILE = "token"
#: A run id names a directory and goes into log lines: one path component of plain characters.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]{0,127}")


class RunDirError(Exception):
    """The run directory (or a file in it) is unsafe to use; the message names the fix."""


def check_run_id(run_id: str) -> str:
    """`run_id` if it is one plain path component (no '/', no '..', no newline); else RunDirError."""
    if not RUN_ID_RE.fullmatch(run_id) or run_id in (".", ".."):
        raise RunDirError(
            f"--run-id {run_id!r} is not a plain name: use letters, digits and . _ + = @ - "
            "(up to 128, no '/', no '..', no spaces or newlines)"
        )
    return run_id


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) with the directory itself 0700; refuse a symlink, a
    non-directory, or a directory owned by another user. An existing directory of ours that
    others can read is tightened to 0700 (it will hold the token)."""
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory {path} ({exc}); pick another --run-dir") from exc
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(
            f"the run directory {path} is a symbolic link (to {os.readlink(path)}); trainwarden does not "
            "follow links there: pass the real directory, or a new --run-dir"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"the run directory {path} exists and is not a directory; pick another --run-dir")
    if st.st_uid != os.geteuid():
        raise RunDirError(
            f"the run directory {path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
            "someone else could read the token and rewrite the logs there; pick a --run-dir of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


#: The files trainwarden writes in a run directory (controller.json is removed and renamed anew).
RUN_FILES = (
    TOKEN_FILE,
    "controller.stderr",
    "controller.log",
    "decisions.jsonl",
    "telemetry.jsonl",
    "summary.json",
)


def refuse_links(run_dir: Path) -> None:
    """RunDirError naming the first of RUN_FILES that is a link or not a regular file: refused with
    the fix, before anything is written (open_private would refuse it too, less clearly)."""
    for name in RUN_FILES:
        path = run_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise RunDirError(
                f"{path} is a symbolic link (to {os.readlink(path)}); trainwarden follows no link in its run "
                "directory: remove the link, or pick a new --run-dir"
            )
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise RunDirError(f"{path} is not a regular file; remove it, or pick a new --run-dir")


def _flags_for(mode: str) -> int:
    base = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    if mode.startswith("a"):
        return base | os.O_WRONLY | os.O_CREAT | os.O_APPEND
    if mode.startswith("w"):
        return base | os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if mode.startswith("x"):
        return base | os.O_WRONLY | os.O_CREAT | os.O_EXCL
    return base | os.O_RDONLY


def open_private(path: Path, mode: str = "a", encoding: str | None = "utf-8") -> IO[Any]:
    """`open(path, mode)` that never follows a symlink, refuses anything but a regular file (or a
    character device), and creates the file 0600 ('a', 'w', 'x'; 'b' in mode for bytes).
    Raises OSError (ELOOP for a link)."""
    # O_NONBLOCK: a FIFO planted there fails the open instead of blocking it (cleared below).
    fd = os.open(path, _flags_for(mode) | os.O_NONBLOCK, 0o600)
    try:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode):  # /dev/null, /dev/full: only root makes one, and never a link
            pass
        elif not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        elif stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode.replace("x", "w"), encoding=None if "b" in mode else encoding)
    except BaseException:
        os.close(fd)
        raise


def private_opener(path: str, flags: int) -> int:
    """An `opener=` for open() and logging.FileHandler: O_NOFOLLOW, created 0600."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def write_private(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text`, 0600, atomically: written under a fresh name
    (O_EXCL) and renamed over it; a symlink at `path` is replaced, never followed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    with open_private(tmp, "x") as fh:
        fh.write(text)
    os.replace(tmp, path)


def remove_stale(path: Path) -> None:
    """Remove `path` (a file or a link, never what a link points to); a directory there is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise RunDirError(
            f"{path} is a directory where trainwarden keeps a file; remove it or pick another --run-dir"
        )
    os.unlink(path)


def read_ready(path: Path, pid: int, nonce: str) -> dict[str, Any] | None:
    """The controller's endpoint file, if the controller of this start (its `pid` and `nonce`)
    wrote it; None while it is not there yet. A file from anyone else is a RunDirError."""
    try:
        with open_private(path, "r") as fh:
            text = fh.read(65536)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunDirError(
            f"{path} cannot be read safely ({exc}): something else put it there; "
            "remove it, or use a run directory only you can write"
        ) from exc
    try:
        ready = json.loads(text)
    except ValueError:
        ready = None  # the controller renames a whole file into place: this one is someone else's
    if not isinstance(ready, dict) or ready.get("pid") != pid or ready.get("nonce") != nonce:
        raise RunDirError(
            f"{path} was not written by the controller this run started (pid {pid}): another "
            "process writes this run directory; use a run directory of your own"
        )
    if not isinstance(ready.get("endpoint"), str) or not isinstance(ready.get("metrics"), str):
        raise RunDirError(f"{path} is missing its endpoint; see {path.parent / 'controller.log'}")
    return ready
