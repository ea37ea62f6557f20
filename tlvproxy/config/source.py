"""Where a serving process loads its table from: a file, or the latest table
from etcd written into a run directory (docs/operations.md "Running a fleet").

Owns: the two sources' `load()` (the same call for a first load, SIGHUP and
/admin/reload), and the run directory's `current` file, which names the
directory of the table every process of a gateway must run.
Must not: talk to etcd (`tlvproxy.etcd.tables` fills the run directory) or
import trio; `load()` is slow and runs off the serving thread.

The run directory (made private, 0700, by the process that watches etcd) holds
one directory per revision read, and `current`: JSON naming the directory of
the latest table that loaded and where it came from. It is replaced whole
(`os.replace`), so a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Final

import attrs

from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import EtcdOrigin
from tlvproxy.config.stored import load_materialised

if TYPE_CHECKING:
    from pathlib import Path

    from tlvproxy.config.compiled import CompiledTable

CURRENT: Final = "current"


@attrs.frozen
class FileSource:
    """The table file given to `serve -c`."""

    path: Path

    def load(self) -> CompiledTable:
        """The table as the file holds it now. Raises TableError."""
        return load_table(self.path)


@attrs.frozen
class RunDirSource:
    """The table `current` names in a gateway's run directory."""

    run_dir: Path

    def load(self) -> CompiledTable:
        """The table of the latest revision that loaded. Raises TableError."""
        where = self.run_dir / CURRENT
        try:
            current = json.loads(where.read_bytes())
            directory, origin = _read_current(current)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TableError([f"{where}: cannot read which table to run: {exc}"]) from None
        return load_materialised(self.run_dir / directory, origin.prefix, origin)


def write_current(run_dir: Path, directory: str, origin: EtcdOrigin) -> None:
    """Make `directory` (a name in `run_dir`) the table of `origin` to run.
    Raises OSError."""
    document = {
        "directory": directory,
        "endpoints": list(origin.endpoints),
        "prefix": origin.prefix,
        "revision": origin.revision,
    }
    staged = run_dir / f".{CURRENT}.new"
    staged.write_text(json.dumps(document))
    os.replace(staged, run_dir / CURRENT)


def _read_current(current: Any) -> tuple[str, EtcdOrigin]:
    directory = current["directory"]
    if not isinstance(directory, str) or "/" in directory or directory in ("", ".", ".."):
        raise ValueError(f"not a directory name: {directory!r}")
    origin = EtcdOrigin(
        endpoints=tuple(str(e) for e in current["endpoints"]),
        prefix=str(current["prefix"]),
        revision=int(current["revision"]),
    )
    return directory, origin
