"""A table kept in etcd: every key and value read is checked before anything is
written, a stored table loads like a file with its problems naming the etcd
keys, and its files cannot lead out of its directory (tlvproxy.config.stored)."""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.e2e.conftest import ROOT
from tests.fixtures import FIXTURE_TABLE
from tlvproxy.config.loader import TableError, load_table
from tlvproxy.config.source import RunDirSource, write_current
from tlvproxy.config.stored import (
    MAX_FILES,
    MAX_VALUE,
    StoredTable,
    StoredTableError,
    load_stored,
    read_stored,
    stored_from,
)
from tlvproxy.etcd.wire import KeyValue

if TYPE_CHECKING:
    from pathlib import Path

PREFIX = "/gw"
PROTO = (ROOT / "proto" / "demo" / "im.proto").read_bytes()


def table_text(**overrides: object) -> bytes:
    document = yaml.safe_load(FIXTURE_TABLE.read_text())
    document["proto"]["paths"] = ["proto"]
    document.update(overrides)
    return yaml.safe_dump(document, sort_keys=False).encode()


def kv(key: str | bytes, value: bytes, revision: int = 1) -> KeyValue:
    raw = key.encode() if isinstance(key, str) else key
    return KeyValue(key=raw, value=value, mod_revision=revision)


def good_keys(**overrides: object) -> list[KeyValue]:
    return [
        kv(f"{PREFIX}/table", table_text(**overrides), 4),
        kv(f"{PREFIX}/files/proto/demo/im.proto", PROTO, 3),
    ]


def test_a_stored_table_loads_like_its_file(tmp_path: Path) -> None:
    stored = read_stored(PREFIX, good_keys())
    assert stored.revision == 4
    assert set(stored.files) == {"proto/demo/im.proto"}
    table = load_stored(stored, tmp_path / "r4", ("http://127.0.0.1:2379",))
    assert table.origin is not None
    assert (table.origin.prefix, table.origin.revision) == (PREFIX, 4)
    assert [c.name for c in table.commands][:3] == ["send_message", "get_profile", "echo"]
    # Written privately: the directory 0700, the files 0600.
    assert (tmp_path / "r4").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "r4" / "proto/demo/im.proto").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "empty name"),
        ("../../etc/passwd", "'..' name"),
        ("proto/./im.proto", "'.' name"),
        ("proto//im.proto", "empty name"),
        ("proto/", "empty name"),
        ("proto/im\x00.proto", "a character other than"),
        ("proto/im\\..\\x", "a character other than"),
        ("commands.yaml", "where the table itself is written"),
        ("a" * 600, "longer than"),
    ],
)
def test_a_file_path_that_could_lead_anywhere_is_refused(path: str, why: str) -> None:
    keys = [*good_keys(), kv(f"{PREFIX}/files/{path}", b"x")]
    with pytest.raises(StoredTableError) as caught:
        read_stored(PREFIX, keys)
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert problem.startswith(f"{PREFIX}/files/")
    assert why in problem


def test_every_bad_key_is_named_at_once() -> None:
    keys = [
        kv(f"{PREFIX}/files/../x", b"x"),
        kv(f"{PREFIX}/other", b"x"),
        kv(b"/gw/files/\xff\xfe", b"x"),
        kv(f"{PREFIX}/files/big.bin", b"x" * (MAX_VALUE + 1)),
    ]
    with pytest.raises(StoredTableError) as caught:
        read_stored(PREFIX, keys)
    problems = caught.value.problems
    assert len(problems) == 5, problems
    assert any("not a key of a table" in p for p in problems)
    assert any("not UTF-8" in p for p in problems)
    assert any("larger than" in p for p in problems)
    assert problems[-1] == f"{PREFIX}/table: no table here (`tlvproxy publish` writes one)"


def test_too_many_files_are_refused() -> None:
    keys = good_keys() + [kv(f"{PREFIX}/files/f{i}", b"") for i in range(MAX_FILES)]
    with pytest.raises(StoredTableError, match=f"more than {MAX_FILES} files"):
        read_stored(PREFIX, keys)


def test_a_file_that_is_also_a_directory_is_refused() -> None:
    keys = [*good_keys(), kv(f"{PREFIX}/files/proto", b"x")]
    with pytest.raises(StoredTableError, match="also a directory"):
        read_stored(PREFIX, keys)


def test_problems_of_a_stored_table_name_its_etcd_keys(tmp_path: Path) -> None:
    keys = [
        kv(
            f"{PREFIX}/table",
            table_text(proto={"paths": ["proto"], "files": ["demo/im.proto"]}) + b"\nbogus: 1\n",
            4,
        ),
        kv(f"{PREFIX}/files/proto/demo/im.proto", b'syntax = "proto3";\nmessage {\n', 3),
    ]
    with pytest.raises(TableError) as caught:
        load_stored(read_stored(PREFIX, keys), tmp_path / "r4", ("http://e:1",))
    problems = caught.value.problems
    assert any(p.startswith(f"{PREFIX}/table:") and "bogus: unknown key" in p for p in problems)
    assert any(p.startswith(f"{PREFIX}/files/proto/demo/im.proto:2:") for p in problems), problems
    assert not any(str(tmp_path) in p for p in problems)


@pytest.mark.parametrize(
    "overrides",
    [
        {"proto": {"paths": ["/"], "files": ["etc/hostname"]}},
        {"proto": {"paths": ["proto"], "files": ["../../../../etc/hostname"]}},
        {"auth": [{"name": "u", "type": "jwt", "keys": "/etc/hostname"}]},
        {"auth": [{"name": "u", "type": "jwt", "keys": "../outside.json"}]},
        {"tls": {"certificates": [{"cert": "/etc/ssl/x.pem", "key": "k.pem"}]}},
    ],
)
def test_a_stored_table_cannot_name_a_file_of_the_gateway(tmp_path: Path, overrides) -> None:
    with pytest.raises(TableError) as caught:
        load_stored(read_stored(PREFIX, good_keys(**overrides)), tmp_path / "r", ("http://e:1",))
    assert any("outside the table's directory" in p for p in caught.value.problems), (
        caught.value.problems
    )


def test_a_link_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "r"
    stored = read_stored(PREFIX, good_keys())
    load_stored(stored, directory, ("http://e:1",))
    (directory / "proto" / "demo" / "im.proto").unlink()
    (directory / "proto" / "demo" / "im.proto").symlink_to(ROOT / "proto" / "demo" / "im.proto")
    with pytest.raises(TableError, match="outside the table's directory"):
        load_table(directory / "commands.yaml", confine=directory)


def test_workers_load_what_current_names(tmp_path: Path) -> None:
    stored = read_stored(PREFIX, good_keys())
    table = load_stored(stored, tmp_path / "000001-r4", ("http://e:1",))
    assert table.origin is not None
    write_current(tmp_path, "000001-r4", table.origin)
    loaded = RunDirSource(tmp_path).load()
    assert loaded.version == table.version
    assert loaded.origin == table.origin
    (tmp_path / "current").write_text(json.dumps({"directory": "../x"}))
    with pytest.raises(TableError, match="cannot read which table to run"):
        RunDirSource(tmp_path).load()


def publish_dir(tmp_path: Path, **overrides: object) -> Path:
    directory = tmp_path / "site"
    (directory / "proto").mkdir(parents=True)
    shutil.copytree(ROOT / "proto" / "demo", directory / "proto" / "demo")
    (directory / "commands.yaml").write_bytes(table_text(**overrides))
    return directory / "commands.yaml"


def test_publish_keys_are_the_table_and_every_file_it_names(tmp_path: Path) -> None:
    path = publish_dir(tmp_path)
    stored = stored_from(path, load_table(path), PREFIX)
    assert isinstance(stored, StoredTable)
    assert set(stored.entries()) == {b"/gw/table", b"/gw/files/proto/demo/im.proto"}
    assert stored.entries()[b"/gw/table"] == path.read_bytes()


def test_publish_refuses_files_outside_the_tables_directory(tmp_path: Path) -> None:
    path = publish_dir(tmp_path, proto={"paths": [str(ROOT / "proto")], "files": ["demo/im.proto"]})
    with pytest.raises(StoredTableError, match="outside the table's directory"):
        stored_from(path, load_table(path), PREFIX)
