"""The deployment files: systemd units pass ``systemd-analyze verify``, example configs load."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from babel_sync.service.config import ServiceConfig
from objstore.config import Config, Profile
from pcache.config import WorkerConfig

pytestmark = pytest.mark.integration  # runs the CLI or servers as processes

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "deploy/systemd").iterdir())
BIN = str(Path(sys.executable).parent)


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze (deploy/install-system-deps.sh installs systemd)")
    assert {u.name for u in UNITS} >= {
        "pcache-worker.service",
        "babel-sync.service",
        "mnt-datasets.mount",
        "pcache-mount@.service",
    }
    copies = []
    for unit in UNITS:  # verified together: the mount unit requires the worker's
        text = re.sub(r"@[A-Z_]+_BIN@", BIN, unit.read_text())
        assert not re.search(r"@[A-Z_]+@", text), f"{unit.name}: a placeholder is left"
        (tmp_path / unit.name).write_text(text)
        copies.append(str(tmp_path / unit.name))
    done = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0 and not problems, problems


# options that give a unit a private mount namespace: a FUSE mount made there is invisible to
# the rest of the system (systemd.exec(5): these imply a new mount namespace)
MOUNT_NAMESPACE_OPTIONS = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem",
    "BindPaths", "BindReadOnlyPaths", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProtectHostname",
    "MountAPIVFS", "RootDirectory", "RootImage", "StateDirectory", "PrivateNetwork",
)  # fmt: skip


def unit_options(name: str) -> dict[str, str]:
    lines = (REPO / "deploy/systemd" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_mount_service_hardening_keeps_the_mount_visible() -> None:
    options = unit_options("pcache-mount@.service")
    assert not set(options) & set(MOUNT_NAMESPACE_OPTIONS), set(options) & set(
        MOUNT_NAMESPACE_OPTIONS
    )
    assert options["CapabilityBoundingSet"] == "CAP_SYS_ADMIN"
    assert options["DeviceAllow"] == "/dev/fuse rw" and options["DevicePolicy"] == "closed"
    assert "@mount" in options["SystemCallFilter"]
    assert "--foreground" in options["ExecStart"]


def test_worker_unit_is_hardened() -> None:
    options = unit_options("pcache-worker.service")
    for key, value in (("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""),
                       ("ProtectSystem", "full"), ("SystemCallFilter", "@system-service")):  # fmt: skip
        assert options.get(key) == value, key
    assert "PrivateDevices" not in options  # /dev/shm is the shared-memory path to clients


def test_babel_sync_unit_is_hardened() -> None:
    unit = (REPO / "deploy/systemd/babel-sync.service").read_text()
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes",
                   "StateDirectory=babel-sync", "CapabilityBoundingSet=\n"):  # fmt: skip
        assert option in unit, option
    assert "BABEL_SYNC_TOKEN" not in unit.split("[Service]", 1)[1].replace("# ", "")  # not in argv


def test_serve_example_config_loads() -> None:
    example = REPO / "deploy/babel-sync/serve.toml.example"
    config = ServiceConfig.load(str(example), env={"BABEL_SYNC_TOKEN": "t" * 24})
    assert config.listen == "127.0.0.1:8470" and config.max_concurrent == 2
    profiles = Config.load(example, env={}, sections=("service",))
    assert profiles.profile("region-a", "s3").endpoint == "https://s3.region-a.example.com"
    with pytest.raises(ValueError, match="token"):
        ServiceConfig.load(str(example), env={})  # no token anywhere: refused


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/docker/Dockerfile, continuation lines joined."""
    text = (REPO / "deploy/docker/Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_what_the_package_needs() -> None:
    """No Docker daemon here: check the Dockerfile against the repository instead. Every COPY
    source exists and is not excluded by .dockerignore, the packages copied are the packages
    setuptools ships, and the extras it installs exist."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = set()
    for word, args in dockerfile_instructions():
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert source not in ignored and source.split("/")[0] not in ignored, source
                copied.add(source.split("/")[0])
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    assert packages <= copied, packages - copied
    assert pyproject["project"]["readme"] in copied
    extras = set(pyproject["project"]["optional-dependencies"])
    text = (REPO / "deploy/docker/Dockerfile").read_text()
    named = re.findall(r"EXTRAS=([a-z,]+)", text)
    assert named, "the Dockerfile names no extras"
    for value in named:
        assert set(value.split(",")) <= extras, value


def test_dockerfile_debian_packages_exist() -> None:
    """The apt packages are in the Debian release of the base image (bookworm, as here)."""
    base = next(a for w, a in dockerfile_instructions() if w == "ARG" and a.startswith("PYTHON_"))
    assert base.endswith("-bookworm")
    if shutil.which("apt-cache") is None or "bookworm" not in Path("/etc/os-release").read_text():
        pytest.skip("needs apt-cache on Debian bookworm")
    names = set()
    for word, args in dockerfile_instructions():
        if word == "RUN" and "apt-get install" in args:
            install = args.split("apt-get install", 1)[1].split("&&")[0].split()
            names |= {n for n in install if not n.startswith("-")}
    assert {"fuse3", "libfuse3-3", "libfuse3-dev"} <= names
    for name in sorted(names):
        shown = subprocess.run(["apt-cache", "show", name], capture_output=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout, f"no Debian package {name}"


def test_commands_in_manifests_are_installed_entry_points() -> None:
    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    scripts |= {"torchrun", "sh"}  # torch's launcher (ckpt extra), the image's shell
    checked = 0
    for path in sorted((REPO / "deploy/k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            pod = spec.get("template", {}).get("spec", spec)
            for c in pod.get("containers", []):
                command = c["command"]
                assert command[0] in scripts, (path.name, command[0])
                checked += 1
                if command[0] == "sh":  # the commands the script runs
                    for used in re.findall(r"(?:exec |\()(\S+) ", command[-1]):
                        assert used in scripts, (path.name, used)
    assert checked >= 4


def keys_named(text: str) -> set[str]:
    """Keys an example file sets or shows commented out (``key =``, ``# key =``, tables)."""
    keys = set(re.findall(r"^#?\s*(\w+) =", text, re.MULTILINE))
    return keys | set(re.findall(r"^\[\[?[\w.-]*?\.?(\w+)\]", text, re.MULTILINE))


@pytest.mark.parametrize(
    ("example", "classes"),
    [
        ("deploy/pcache/pcache.toml.example", (WorkerConfig, Profile)),
        ("deploy/babel-sync/serve.toml.example", (ServiceConfig,)),
    ],
)
def test_examples_show_every_option(example: str, classes: tuple[type, ...]) -> None:
    named = keys_named((REPO / example).read_text())
    for cls in classes:
        fields = {f.name for f in dataclasses.fields(cls)} - {"name", "profiles"}
        assert fields <= named, f"{example} does not show {sorted(fields - named)}"


def test_pcache_example_config_loads() -> None:
    config = WorkerConfig.load(
        REPO / "deploy/pcache/pcache.toml.example",
        env={"PCACHE_TOKEN": "t" * 24, "OBJSTORE_PROFILE_REGION_B_ACCESS_KEY_ID": "AK"},
    )
    assert config.membership_file is not None and len(config.cache_dirs) == 2
    assert config.profiles.profile("region-b", "s3").access_key_id == "AK"
