"""What only the local backend has to get right: permissions, a full disk, keys a directory tree
cannot hold, crash leftovers, and that nothing escapes the root."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from objstore import AccessDenied, InsufficientStorage, InvalidKey, open_store
from objstore.local import LocalStore

pytestmark = pytest.mark.timeout(60)
ROOT_USER = os.geteuid() == 0


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    root = tmp_path / "bucket"
    root.mkdir()
    made = open_store(str(root))
    assert isinstance(made, LocalStore)
    return made


@pytest.mark.parametrize("key", ["a//b", "./a", "a/./b", "a/", "../../etc/passwd", "/etc/passwd"])
def test_keys_a_tree_cannot_hold_are_refused(store: LocalStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.put(key, b"x")
    assert list(store.root.iterdir()) == []


def test_nothing_written_outside_root(store: LocalStore, tmp_path: Path) -> None:
    for key in ("../outside", "a/../../outside", "/tmp/outside-" + uuid.uuid4().hex):
        with pytest.raises(InvalidKey):
            store.put(key, b"x")
    assert not (tmp_path / "outside").exists()


def test_file_and_directory_name_conflicts(store: LocalStore) -> None:
    store.put("a", b"file")
    with pytest.raises(InvalidKey, match="an object has that name"):
        store.put("a/b", b"nested")
    store.put("d/e", b"nested")
    with pytest.raises(InvalidKey, match="directory of other objects"):
        store.put("d", b"file")
    assert store.get("a") == b"file" and store.get("d/e") == b"nested"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".objstore")] == []


def test_crash_leftovers_are_invisible(store: LocalStore) -> None:
    store.put("dir/real", b"data")
    (store.root / "dir" / ".objstore-tmp-deadbeef").write_bytes(b"half-written")
    assert [o.key for o in store.iter_list()] == ["dir/real"]
    assert store.list_page(delimiter="/").prefixes == ["dir/"]


def test_metadata_in_xattrs(store: LocalStore) -> None:
    store.put("m", b"x", metadata={"CRC64": "42"})
    assert os.getxattr(store.root / "m", "user.objstore.crc64") == b"42"
    copied = store.copy("m", "n")
    assert copied.metadata == {"crc64": "42"} == store.stat("n").metadata


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk (needs root and mount)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if not ROOT_USER:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_a_clear_error_and_keeps_old_data(tiny_disk: Path) -> None:
    store = open_store(str(tiny_disk))
    store.put("ckpt", b"old")
    with pytest.raises(InsufficientStorage, match="no space left"):
        store.put("ckpt", os.urandom(2 * 1024 * 1024))
    assert store.get("ckpt") == b"old"  # the failed write replaced nothing
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["ckpt"]  # and left no temp file


@pytest.mark.integration  # starts a process
def test_permission_denied(tmp_path: Path) -> None:
    """A real EACCES: as root, run the store in a child process that drops to 'nobody'."""
    root = tmp_path / "private"
    root.mkdir()
    (root / "secret").write_bytes(b"s")
    os.chmod(root / "secret", 0o600)
    os.chmod(tmp_path, 0o755)
    # The child imports everything first, then (as root) drops to 'nobody': the interpreter
    # itself may live where 'nobody' cannot read it.
    drop = "os.setgid(65534); os.setuid(65534)\n" if ROOT_USER else ""
    code = (
        "import os\n"
        "from objstore import open_store, AccessDenied\n"
        f"s = open_store({str(root)!r})\n"
        f"{drop}"
        "for op in (lambda: s.get('secret'), lambda: s.put('new', b'x')):\n"
        "    try:\n"
        "        op()\n"
        "    except AccessDenied as e:\n"
        "        assert isinstance(e, PermissionError)\n"
        "        print('denied:', e)\n"
    )
    if ROOT_USER:
        os.chmod(root, 0o755)
        for parent in (p for p in tmp_path.parents if p != Path("/")):  # let 'nobody' traverse
            os.chmod(parent, os.stat(parent).st_mode | 0o001)
    else:
        os.chmod(root, 0o555)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("permission denied" in line for line in lines), done.stdout


def test_access_denied_class_is_permission_error() -> None:
    assert issubclass(AccessDenied, PermissionError)
