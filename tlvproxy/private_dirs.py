"""The private directories a gateway keeps while it runs (docs/operations.md
"Private directories"), and the removal of those a killed gateway left.

Owns: making each directory, 0700 in the system's temporary directory, named
after its kind and the process that made it; removing, when a gateway starts,
those whose process is gone. A gateway removes its own when it stops; one
killed with SIGKILL (or by the OOM killer) cannot, and its directories may hold
copies of TLS keys (a table from etcd) and the pages of the rate-limit store.
Must not: remove a directory of a process still running, of another user, or
anything that is not a directory of ours.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Final, Literal

log = logging.getLogger("tlvproxy.supervisor")

Kind = Literal["etcd", "metrics", "run"]
_NAME: Final = re.compile(r"tlvproxy-(?:etcd|metrics|run)-([0-9]{1,10})-[A-Za-z0-9_]+")


def make_private_dir(kind: Kind) -> Path:
    """A new directory of this process's own (mode 0700)."""
    return Path(tempfile.mkdtemp(prefix=f"tlvproxy-{kind}-{os.getpid()}-"))


def remove_abandoned(parent: Path | None = None) -> None:
    """Remove the directories of `make_private_dir` in `parent` (the system's
    temporary directory) whose process no longer runs."""
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    uid = os.getuid()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        found = _NAME.fullmatch(entry.name)
        if found is None or _alive(int(found[1])):
            continue
        try:
            status = entry.lstat()
        except OSError:
            continue
        if not entry.is_dir() or entry.is_symlink() or status.st_uid != uid:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log.info("removed the directory of a gateway that was killed", extra={"path": str(entry)})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or no pid at all: leave it
    return True
