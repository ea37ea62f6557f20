"""A table as kept in etcd: its keys read, checked, written to a directory and
loaded; and the keys `publish` writes for a table file (docs/operations.md
"Running a fleet").

Owns: the key layout (`{prefix}/table` holds the YAML text, `{prefix}/files/PATH`
each file it names, PATH relative to the table), the checks on every key and
value read (they are untrusted input: whoever can write to etcd wrote them),
writing a checked table into a private directory, and naming the etcd key in
each problem of a table that fails to load.
Must not: talk to etcd or import trio (`tlvproxy.etcd` does that); the callers
pass the keys read and run the (slow) load off the serving thread.

Checks on what is read: only `table` and `files/PATH` keys under the prefix;
at most MAX_FILES files, MAX_VALUE bytes each and MAX_TOTAL in all; PATH made
of names of `_PATH_NAME` characters (no `.` or `..`, no empty name, so no
absolute path), at most MAX_PATH characters. A stored table that breaks one of
them is refused whole, every problem named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.model import EtcdOrigin, JwtAuthSpec
from tlvproxy.schema.protos import WELL_KNOWN_INCLUDE

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from tlvproxy.config.compiled import CompiledTable
    from tlvproxy.etcd.wire import KeyValue

TABLE_KEY: Final = "table"
FILES_KEY: Final = "files/"
# The name the table is written under, in the directory its files are in;
# no file of the table may have it.
TABLE_FILE: Final = "commands.yaml"
MAX_FILES: Final = 500
MAX_VALUE: Final = 4 * 1024 * 1024
MAX_TOTAL: Final = 16 * 1024 * 1024
MAX_PATH: Final = 512
_PATH_NAME = re.compile(r"[A-Za-z0-9_.+@=,~-]+")


class StoredTableError(TableError):
    """The keys under a prefix are not a table; `problems` name each key."""


@attrs.frozen
class StoredTable:
    """The keys of one table: its text and files (PATH -> content), and the
    revision of the latest change among them."""

    prefix: str
    table: bytes
    files: Mapping[str, bytes]
    revision: int

    def entries(self) -> dict[bytes, bytes]:
        """Every key and value, as `publish` writes them."""
        found = {f"{self.prefix}/{TABLE_KEY}".encode(): self.table}
        for path, content in self.files.items():
            found[f"{self.prefix}/{FILES_KEY}{path}".encode()] = content
        return found


def check_path(path: str) -> str | None:
    """Why `path` cannot be a file's PATH, or None when it can."""
    if not path:
        return "the path is empty"
    if len(path) > MAX_PATH:
        return f"the path is longer than {MAX_PATH} characters"
    for name in path.split("/"):
        if not name:
            return "the path has an empty name (a leading, trailing or double /)"
        if name in (".", ".."):
            return f"the path has a {name!r} name"
        if not _PATH_NAME.fullmatch(name):
            return f"the name {name[:40]!r} has a character other than letters, digits, ._+@=,~-"
    if path == TABLE_FILE:
        return f"{TABLE_FILE} is where the table itself is written"
    return None


def read_stored(prefix: str, kvs: Iterable[KeyValue]) -> StoredTable:
    """The table kept under `prefix`, from every key read under `prefix/`.

    Raises StoredTableError naming each key that breaks a check (see the
    module doc), or saying there is no table."""
    problems: list[str] = []
    table: bytes | None = None
    files: dict[str, bytes] = {}
    total = 0
    revision = 0
    head = f"{prefix}/".encode()
    for kv in kvs:
        shown = kv.key[:200].decode("utf-8", errors="replace")
        revision = max(revision, kv.mod_revision)
        total += len(kv.value)
        if not kv.key.startswith(head):
            problems.append(f"{shown}: not under {prefix}/")
            continue
        try:
            name = kv.key[len(head) :].decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{shown}: the key is not UTF-8")
            continue
        if kv.oversize or len(kv.value) > MAX_VALUE:
            problems.append(f"{shown}: the value is larger than {MAX_VALUE} bytes")
            continue
        if name == TABLE_KEY:
            table = kv.value
        elif name.startswith(FILES_KEY):
            path = name[len(FILES_KEY) :]
            why = check_path(path)
            if why is not None:
                problems.append(f"{shown}: {why}")
            elif len(files) == MAX_FILES:
                problems.append(f"{shown}: more than {MAX_FILES} files")
            else:
                files[path] = kv.value
        else:
            problems.append(
                f"{shown}: not a key of a table (expected {prefix}/{TABLE_KEY} "
                f"or {prefix}/{FILES_KEY}PATH)"
            )
    if total > MAX_TOTAL:
        problems.append(f"{prefix}/: the values add up to more than {MAX_TOTAL} bytes")
    if table is None:
        problems.append(f"{prefix}/{TABLE_KEY}: no table here (`tlvproxy publish` writes one)")
    if problems:
        raise StoredTableError(problems)
    assert table is not None
    # A file cannot also be a directory of others (files/a and files/a/b).
    directories = {path.rsplit("/", n)[0] for path in files for n in range(1, path.count("/") + 1)}
    problems += [
        f"{prefix}/{FILES_KEY}{path}: also a directory of other files"
        for path in files
        if path in directories
    ]
    if problems:
        raise StoredTableError(problems)
    return StoredTable(prefix=prefix, table=table, files=files, revision=revision)


def materialise(stored: StoredTable, directory: Path) -> Path:
    """Write `stored` into `directory` (made, mode 0700, and must not exist);
    returns the table's path. Files are new regular files (mode 0600), never
    followed links. Raises OSError."""
    directory.mkdir(mode=0o700)
    table = directory / TABLE_FILE
    _write(table, stored.table)
    for path, content in stored.files.items():
        target = directory / path
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(target, content)
    return table


def _write(path: Path, content: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)


def load_materialised(directory: Path, prefix: str, origin: EtcdOrigin) -> CompiledTable:
    """Load the table `materialise` wrote into `directory`, as read from `origin`.

    Raises TableError whose problems name the etcd keys, not the directory."""
    try:
        table = load_table(directory / TABLE_FILE, confine=directory)
    except TableError as exc:
        raise TableError([_named(p, directory, prefix) for p in exc.problems]) from None
    warnings = tuple(_named(w, directory, prefix) for w in table.warnings)
    return attrs.evolve(table, origin=origin, warnings=warnings)


def _named(problem: str, directory: Path, prefix: str) -> str:
    """`problem` with the paths under `directory` written as their etcd keys."""
    root = str(directory)
    problem = problem.replace(str(directory / TABLE_FILE), f"{prefix}/{TABLE_KEY}")
    problem = problem.replace(root + "/", f"{prefix}/{FILES_KEY}")
    return problem.replace(root, f"{prefix}/{FILES_KEY}")


def load_stored(stored: StoredTable, directory: Path, endpoints: tuple[str, ...]) -> CompiledTable:
    """Materialise `stored` into `directory` and load it. Raises TableError
    (problems naming etcd keys) or OSError (the directory cannot be written)."""
    materialise(stored, directory)
    origin = EtcdOrigin(endpoints=endpoints, prefix=stored.prefix, revision=stored.revision)
    return load_materialised(directory, stored.prefix, origin)


# ---------------------------------------------------------------- publish


def files_of(table: CompiledTable) -> list[Path]:
    """Every file `table` was loaded from but the table itself: the .proto files
    protoc read (imports included, not the well-known types), the JWT key set
    files and the TLS certificates and keys."""
    found: list[Path] = []
    if table.schema is not None:
        for name in table.schema.files:
            for root in (*table.proto.paths, WELL_KNOWN_INCLUDE):
                candidate = root / name
                if candidate.is_file():
                    if root != WELL_KNOWN_INCLUDE:
                        found.append(candidate)
                    break
    found += [
        Path(spec.keys)
        for spec in table.auth.values()
        if isinstance(spec, JwtAuthSpec) and not spec.remote
    ]
    if table.tls is not None:
        for certificate in table.tls.certificates:
            found += [certificate.cert, certificate.key]
    return found


def stored_from(table_path: Path, table: CompiledTable, prefix: str) -> StoredTable:
    """The keys `publish` writes for `table`, loaded from `table_path`.

    Raises StoredTableError naming each file that cannot be kept in etcd (one
    outside the table's directory, a path `check_path` refuses, too large),
    or OSError when one cannot be read."""
    # Paths as the table names them: a link in the publisher's tree is read
    # through, and its target need not be under the table's directory.
    base = Path(os.path.abspath(table_path.parent))
    text = table_path.read_bytes()
    problems: list[str] = []
    files: dict[str, bytes] = {}
    for file in files_of(table):
        absolute = Path(os.path.normpath(os.path.abspath(file)))
        try:
            path = absolute.relative_to(base).as_posix()
        except ValueError:
            problems.append(
                f"{file}: outside the table's directory {base}: etcd keeps the files "
                "of a table by their path relative to it"
            )
            continue
        why = check_path(path)
        if why is not None:
            problems.append(f"{file}: {why}")
            continue
        files[path] = absolute.read_bytes()
    sizes = {str(table_path): len(text)} | {path: len(c) for path, c in files.items()}
    problems += [
        f"{path}: larger than {MAX_VALUE} bytes" for path, n in sizes.items() if n > MAX_VALUE
    ]
    if len(files) > MAX_FILES:
        problems.append(f"{table_path}: the table names more than {MAX_FILES} files")
    if sum(sizes.values()) > MAX_TOTAL:
        problems.append(f"{table_path}: the table and its files exceed {MAX_TOTAL} bytes")
    if problems:
        raise StoredTableError(problems)
    return StoredTable(prefix=prefix, table=text, files=files, revision=0)
