"""``pcache mount`` and ``pcache umount``: checks, daemonising, the trio main loop, clean unmount.

``pcache mount NS[/PREFIX] MOUNTPOINT`` checks the mount point and the worker, then (unless
``--foreground``) starts itself again in the foreground in a new session, with its output in a log
file, and returns once the mount is live. The foreground process runs pyfuse3 under trio with the
handlers of :mod:`pcache.fuse_ops`; SIGTERM/SIGINT, ``pcache umount`` and ``fusermount3 -u`` all
end it with the file system unmounted.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objstore.cli import CommandError, ExitCode

from . import collector
from .client import PcacheClient, split_path
from .config import CONFIG_ENV, ClientConfig, Durability
from .localcache import raise_open_files_limit

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
START_TIMEOUT_S = 30.0
READAHEAD_BYTES = 4 << 20  # the kernel's readahead window for the mount (set_readahead)


@dataclass(frozen=True)
class MountOptions:
    """What ``pcache mount`` was asked for.

    Attributes:
        source: ``NS`` or ``NS/PREFIX`` (a ``pcache://`` prefix is accepted).
        mountpoint: an existing empty directory.
        read_only: refuse all changes (``EROFS``).
        immutable: the objects never change: long cache timeouts, ``keep_cache``.
        log_file: where the daemon writes its log (foreground: stderr unless given).
        allow_other: other users may use the mount (``allow_other``; for users other than
            root, ``user_allow_other`` must be set in ``/etc/fuse.conf``).
        uid, gid: the owner shown for entries that carry none (default: the mounting user).
        durability: when ``close`` returns (local-durable or in the store).
        sync_timeout: seconds ``fsync`` waits for a store that fails transiently.
        negative_ttl: seconds a directory's listing answers "no such name" without asking
            the store (0, default: every lookup of a missing name asks, so an object another
            writer just put is seen at once).
    """

    source: str
    mountpoint: Path
    read_only: bool = False
    immutable: bool = False
    log_file: Path | None = None
    allow_other: bool = False
    uid: int | None = None
    gid: int | None = None
    durability: Durability = Durability.LOCAL
    sync_timeout: float = 120.0
    negative_ttl: float = 0.0

    @property
    def namespace(self) -> str:
        return split_path(self.source)[0]

    @property
    def prefix(self) -> str:
        prefix = split_path(self.source)[1].strip("/")
        return prefix + "/" if prefix else ""


# -- checks ----------------------------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mount point, including a FUSE mount whose daemon died."""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo") as file:
            for line in file:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                    return True
    except OSError:
        pass
    return os.path.ismount(target)


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse (``ExitCode.USAGE``) what cannot be mounted on."""
    if not os.path.exists(FUSE_DEVICE):
        raise CommandError(f"{FUSE_DEVICE} is missing: FUSE is not available here", ExitCode.USAGE)
    if is_mounted(mountpoint):
        try:
            os.stat(mountpoint)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise CommandError(
                    f"{mountpoint} is a stale mount (its process died); clear it with "
                    f"`pcache umount {mountpoint}`, then mount again",
                    ExitCode.USAGE,
                ) from None
        raise CommandError(f"{mountpoint} is already a mount point", ExitCode.USAGE)
    if not mountpoint.exists():
        raise CommandError(f"mount point {mountpoint} does not exist", ExitCode.USAGE)
    if not mountpoint.is_dir():
        raise CommandError(f"mount point {mountpoint} is not a directory", ExitCode.USAGE)
    try:
        if any(mountpoint.iterdir()):
            raise CommandError(f"mount point {mountpoint} is not empty", ExitCode.USAGE)
    except PermissionError:
        raise CommandError(
            f"mount point {mountpoint}: permission denied", ExitCode.ACCESS
        ) from None


def check_source(client: PcacheClient, options: MountOptions) -> None:
    """The worker answers and serves the namespace (else one clear line)."""
    namespaces = client.info().get("namespaces", [])
    if options.namespace not in namespaces:
        raise CommandError(
            f"unknown namespace {options.namespace!r} (the worker serves: "
            f"{', '.join(namespaces) or 'none'})",
            ExitCode.NOT_FOUND,
        )


def fuse_options(options: MountOptions) -> set[str]:
    import pyfuse3

    result = set(pyfuse3.default_options)  # default_permissions
    # no max_read: libfuse refuses it unless the init handler sets conn->max_read too, which
    # pyfuse3's does not; read sizes then follow the kernel's readahead window
    result |= {"fsname=pcache", "subtype=pcache"}
    if options.read_only:
        result.add("ro")
    if options.allow_other:
        result.add("allow_other")
    return result


def set_readahead(mountpoint: Path, nbytes: int) -> bool:
    """Raise the kernel's readahead window of the mount (``/sys/class/bdi/MAJ:MIN``).

    The default (128 KiB) also caps every FUSE read at 128 KiB; a larger window lets the kernel
    send the largest reads FUSE allows (1 MiB) and several at once. Needs root; best effort.
    """
    try:
        dev = os.stat(mountpoint).st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        path.write_text(f"{nbytes // 1024}\n")
    except OSError as exc:
        log.info("readahead of %s left at the kernel default: %s", mountpoint, exc)
        return False
    log.info("readahead of %s set to %d KiB", mountpoint, nbytes // 1024)
    return True


# -- foreground ------------------------------------------------------------------------------------


def run_foreground(client: PcacheClient, options: MountOptions) -> None:
    """Mount and serve until unmounted or signalled; always leaves nothing mounted."""
    import pyfuse3
    import trio

    from .fuse_ops import PcacheOperations

    # random reads keep their block files open (pcache.localcache): room for thousands
    log.info("descriptor limit %d", raise_open_files_limit())
    ops = PcacheOperations(
        client,
        options.namespace,
        options.prefix,
        read_only=options.read_only,
        immutable=options.immutable,
        mountpoint=str(options.mountpoint),
        uid=options.uid,
        gid=options.gid,
        durability=options.durability,
        sync_timeout=options.sync_timeout,
        negative_ttl=options.negative_ttl,
    )
    try:
        pyfuse3.init(ops, str(options.mountpoint), fuse_options(options))
    except RuntimeError as exc:
        raise CommandError(f"cannot mount {options.mountpoint}: {exc}") from None
    log.info(
        "mounted %s on %s (pid %d%s%s)",
        options.source,
        options.mountpoint,
        os.getpid(),
        ", read-only" if options.read_only else "",
        ", immutable" if options.immutable else "",
    )
    unmounted = False
    collector.tune()  # a directory read allocates per entry while the inode table stays
    collector.freeze_startup_heap()
    try:
        trio.run(_serve, options.mountpoint)
        unmounted = not is_mounted(options.mountpoint)
    finally:
        ops.abort_writes()
        try:
            pyfuse3.close(unmount=not unmounted)
        except Exception as exc:
            log.warning("unmount of %s: %s", options.mountpoint, exc)
        log.info("unmounted %s", options.mountpoint)


async def _serve(mountpoint: Path) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery:
        # a stat of the mount point is answered by this process: only once the loop runs
        nursery.start_soon(trio.to_thread.run_sync, set_readahead, mountpoint, READAHEAD_BYTES)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("%s: unmounting", signal.Signals(signum).name)
                    pyfuse3.terminate()
                    await trio.sleep(10)  # handlers in flight get this long to finish
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


# -- daemon ----------------------------------------------------------------------------------------


def default_log_file(mountpoint: Path) -> Path:
    name = str(mountpoint.resolve()).strip("/").replace("/", "_") or "root"
    return Path(tempfile.gettempdir()) / f"pcache-mount-{os.getuid()}-{name}.log"


def spawn_daemon(argv: list[str], options: MountOptions) -> str:
    """Start ``pcache mount ... --foreground`` detached; return once the mount is live."""
    log_file = options.log_file or default_log_file(options.mountpoint)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = log_file.stat().st_size if log_file.exists() else 0
    command = [
        sys.executable,
        "-m",
        "pcache.cli",
        *argv,
        "--foreground",
        "--log-file",
        str(log_file),
    ]
    with open(log_file, "ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if is_mounted(options.mountpoint):
            return f"mounted {options.source} on {options.mountpoint} (pid {process.pid}, log {log_file})"
        code = process.poll()
        if code is not None:
            with open(log_file, "rb") as file:
                file.seek(start)
                lines = [ln for ln in file.read().decode(errors="replace").splitlines() if ln]
            reason = lines[-1] if lines else f"exited with status {code}"
            reason = reason.split("error: ", 1)[-1]
            known = code in {int(c) for c in ExitCode}
            raise CommandError(
                f"mount failed: {reason}", ExitCode(code) if known else ExitCode.FAILED
            )
        time.sleep(0.05)
    process.terminate()
    raise CommandError(
        f"mount of {options.mountpoint} not live after {START_TIMEOUT_S:.0f}s (log: {log_file})"
    )


# -- commands --------------------------------------------------------------------------------------


def _setup_log_file(path: Path, verbosity: int) -> None:
    """Log to ``path`` only: a daemon's stderr is the same file, and lines must not double."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
    for name in ("urllib3", "botocore", "boto3", "pyfuse3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _daemon_argv(args: Any, options: MountOptions) -> list[str]:
    """The command line the daemon repeats (paths made absolute: it may start elsewhere)."""
    argv = ["mount", options.source, str(options.mountpoint)]
    if getattr(args, "config", None):
        argv += ["--config", os.path.abspath(args.config)]
    if args.worker:
        argv += ["--worker", args.worker]
    if options.read_only:
        argv.append("--read-only")
    if options.immutable:
        argv.append("--immutable")
    if getattr(args, "timeout", None):
        argv += ["--timeout", str(args.timeout)]
    if options.allow_other:
        argv.append("--allow-other")
    if options.uid is not None:
        argv += ["--uid", str(options.uid)]
    if options.gid is not None:
        argv += ["--gid", str(options.gid)]
    if options.durability is not Durability.LOCAL:
        argv += ["--durability", options.durability.value]
    if getattr(args, "sync_timeout", None):
        argv += ["--sync-timeout", str(args.sync_timeout)]
    if getattr(args, "negative_ttl", None):
        argv += ["--negative-ttl", str(args.negative_ttl)]
    argv += ["-v"] * (getattr(args, "verbose", 0) or 0)
    return argv


def mount_command(args: Any) -> int:
    """``pcache mount`` (see the module docstring)."""
    options = MountOptions(
        source=args.source,
        mountpoint=Path(os.path.abspath(args.mountpoint)),
        read_only=args.read_only,
        immutable=args.immutable,
        log_file=Path(os.path.abspath(args.log_file)) if args.log_file else None,
        allow_other=getattr(args, "allow_other", False),
        uid=getattr(args, "uid", None),
        gid=getattr(args, "gid", None),
        durability=Durability(getattr(args, "durability", None) or Durability.LOCAL),
        sync_timeout=getattr(args, "sync_timeout", None) or 120.0,
        negative_ttl=getattr(args, "negative_ttl", None) or 0.0,
    )
    try:
        options.namespace  # noqa: B018 (validates the source)
    except ValueError as exc:
        raise CommandError(str(exc), ExitCode.USAGE) from None
    check_mountpoint(options.mountpoint)
    config_file = getattr(args, "config", None)
    config = ClientConfig.load(config_file)
    if args.worker:
        config = dataclasses.replace(config, worker=args.worker)
    if getattr(args, "timeout", None):
        if args.timeout <= 0:
            raise CommandError("--timeout must be > 0", ExitCode.USAGE)
        config = dataclasses.replace(config, timeout=args.timeout)
    if config_file and not os.environ.get(CONFIG_ENV):
        # the client's last-resort direct reads need the profiles of the same file
        os.environ[CONFIG_ENV] = os.path.abspath(config_file)
    if not args.foreground:
        with PcacheClient(config) as client:
            check_source(client, options)
        print(spawn_daemon(_daemon_argv(args, options), options))
        return ExitCode.OK
    if options.log_file:
        _setup_log_file(options.log_file, getattr(args, "verbose", 0))
    client = PcacheClient(config)
    try:
        check_source(client, options)
        run_foreground(client, options)
    finally:
        client.close()
    return ExitCode.OK


def stats_command(mountpoint: str, as_json: bool) -> int:
    """``pcache stats MOUNTPOINT``: the mount's live statistics (its hidden control file)."""
    import json

    from .mount_stats import CONTROL_NAME, format_stats

    target = os.path.abspath(mountpoint)
    if not is_mounted(target):
        raise CommandError(f"{target} is not mounted", ExitCode.USAGE)
    try:
        with open(os.path.join(target, CONTROL_NAME), "rb") as file:
            snapshot = json.loads(file.read())
    except FileNotFoundError:
        raise CommandError(f"{target} is not a pcache mount", ExitCode.USAGE) from None
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read the statistics of {target}: {exc}") from None
    if as_json:
        print(json.dumps(snapshot, indent=1))
    else:
        print(format_stats(snapshot))
    return ExitCode.OK


def umount_command(mountpoint: str) -> int:
    """``pcache umount``: one clear line when not mounted or busy."""
    target = os.path.abspath(mountpoint)
    if not is_mounted(target):
        raise CommandError(f"{target} is not mounted", ExitCode.USAGE)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    command = [tool, "-u", target] if tool else ["umount", target]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
        if "busy" in message.lower():
            raise CommandError(
                f"{target} is busy (a process has a file or its working directory there); "
                "close them, or detach it with `umount -l`"
            )
        raise CommandError(f"cannot unmount {target}: {message}")
    return ExitCode.OK
