"""``mount.pcache``: the helper ``mount -t pcache`` and ``/etc/fstab`` call.

mount(8) runs ``mount.pcache SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]``; this turns the options into
a ``pcache mount`` command line and runs it (a daemon that returns once the mount is live), so an
fstab line or a systemd ``.mount`` unit mounts a pcache namespace::

    datasets/tokens  /mnt/tokens  pcache  ro,immutable,config=/etc/pcache/pcache.toml,_netdev,nofail  0 0

Options of our own: ``ro``/``rw``, ``immutable``, ``allow_other``, ``uid=N``, ``gid=N``, ``durability=local|remote``,
``timeout=SECONDS``, ``config=FILE``, ``worker=URL``, ``log=FILE``. The generic ones mount(8) and systemd handle themselves (``defaults``, ``auto``,
``noauto``, ``user``, ``nofail``, ``_netdev``, ``x-systemd.*``, ...) are ignored; anything else is
refused with exit code 2, so a typo never mounts with a silently wrong setting. Install it with
``ln -s $(command -v mount.pcache) /sbin/mount.pcache`` (``deploy/pcache/install.sh`` does).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from objstore.cli import ExitCode

IGNORED = {
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nofail",
    "_netdev",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "async",
}
VALUED = {
    "config": "--config",
    "worker": "--worker",
    "log": "--log-file",
    "uid": "--uid",
    "gid": "--gid",
    "timeout": "--timeout",
    "durability": "--durability",
    "sync_timeout": "--sync-timeout",
    "negative_ttl": "--negative-ttl",
}


class MountHelperError(ValueError):
    """An option ``mount.pcache`` does not understand."""


def pcache_argv(source: str, mountpoint: str, argv: Sequence[str]) -> list[str]:
    """The ``pcache`` arguments for ``mount.pcache SOURCE MOUNTPOINT *argv``."""
    options: list[str] = []
    verbose = 0
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "-o":
            if not args:
                raise MountHelperError("-o needs a value")
            options += [o for o in args.pop(0).split(",") if o]
        elif arg.startswith("-o") and len(arg) > 2:
            options += [o for o in arg[2:].split(",") if o]
        elif arg in ("-s", "-f", "-n"):  # sloppy, fake (mount -f), no mtab: nothing to do
            if arg == "-f":
                return []
        elif arg == "-v":
            verbose += 1
        else:
            raise MountHelperError(f"unexpected argument {arg!r}")
    result = ["mount", source, mountpoint]
    for option in options:
        name, _, value = option.partition("=")
        if option == "ro":
            result.append("--read-only")
        elif option == "rw":
            continue
        elif option == "immutable":
            result.append("--immutable")
        elif option == "allow_other":
            result.append("--allow-other")
        elif name in VALUED:
            if not value:
                raise MountHelperError(f"option {name} needs a value ({name}=...)")
            result += [VALUED[name], value]
        elif option in IGNORED or name.startswith(("x-", "comment")):
            continue
        else:
            raise MountHelperError(f"unknown mount option {option!r}")
    return result + ["-v"] * verbose


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        print("usage: mount.pcache SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]", file=sys.stderr)
        return ExitCode.OK if args[:1] in (["-h"], ["--help"]) else ExitCode.USAGE
    try:
        command = pcache_argv(args[0], args[1], args[2:])
    except MountHelperError as exc:
        print(f"mount.pcache: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if not command:
        return ExitCode.OK
    from .cli import main as pcache_main

    return pcache_main(command)


if __name__ == "__main__":
    sys.exit(main())
