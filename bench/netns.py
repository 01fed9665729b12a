"""Network namespaces with rate-capped links, for benchmarks that need several "nodes" on one box.

:class:`Topology` builds ``count`` namespaces (``PREFIX-n1`` ...), each joined to the root
namespace by a veth pair whose root-side end sits on one bridge (``PREFIX-br``, address
``SUBNET.1``); namespace ``i`` gets ``SUBNET.(10+i)``. Each link is capped with ``tc htb`` in
both directions: on the root-side end (traffic into the namespace) and on the namespace-side end
(traffic out of it). Traffic between two namespaces therefore crosses two caps, the sender's
egress and the receiver's ingress, like two hosts on a switch with one NIC each. Traffic inside a
namespace (a client talking to the worker on its own node) stays on that namespace's loopback
and is not capped, as on a real node.

Needs root and iproute2; ``netem`` is not used (this kernel lacks it). Byte counters come from
the root-side veth's sysfs statistics, so reading them needs no ``ip netns exec``.

Not thread-safe; one :class:`Topology` per process, set up once and torn down once (teardown is
idempotent and also removes what a half-finished setup left behind).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class TopologyError(RuntimeError):
    """Namespaces, links or qdiscs could not be created (message names the failing command)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise TopologyError(
            f"`{' '.join(cmd)}` failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result


@dataclass
class Topology:
    """``count`` namespaces on one bridge, each link capped at ``rate`` both ways.

    Attributes:
        prefix: name prefix for namespaces, bridge and veths (keep it <= 8 characters: Linux
            interface names are limited to 15).
        subnet: the first three octets of a /24 used only by this topology.
        count: namespaces to create.
        rate: htb rate per direction per link, as ``tc`` reads it (``400mbit``, ``1gbit``).
    """

    prefix: str = "pcb"
    subnet: str = "10.77.0"
    count: int = 3
    rate: str = "400mbit"

    def __post_init__(self) -> None:
        if len(self.prefix) > 8 or not self.prefix.replace("-", "").isalnum():
            raise ValueError(f"prefix {self.prefix!r}: use up to 8 letters, digits or '-'")
        self._created = False

    # -- names ---------------------------------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def host_address(self) -> str:
        """The bridge's address: how namespaces reach services in the root namespace."""
        return f"{self.subnet}.1"

    def netns(self, i: int) -> str:
        """Namespace of node ``i`` (1-based)."""
        return f"{self.prefix}-n{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def host_veth(self, i: int) -> str:
        return f"{self.prefix}{i}h"

    def ns_veth(self, i: int) -> str:
        return f"{self.prefix}{i}n"

    @property
    def namespaces(self) -> list[str]:
        return [self.netns(i) for i in range(1, self.count + 1)]

    @property
    def addresses(self) -> list[str]:
        return [self.address(i) for i in range(1, self.count + 1)]

    # -- checks --------------------------------------------------------------------------------

    @staticmethod
    def check_privileges() -> None:
        """Raise :class:`TopologyError` unless namespaces and qdiscs can be created here."""
        if os.geteuid() != 0:
            raise TopologyError("network namespaces and tc need root: run this as root")
        for tool in ("ip", "tc"):
            if _run("which", tool, check=False).returncode != 0:
                raise TopologyError(f"`{tool}` not found: install iproute2")
        _run("ip", "netns", "list")

    def leftovers(self) -> list[str]:
        """Namespaces and links of this prefix that already exist (an earlier run's debris)."""
        found = [
            ns for ns in _run("ip", "netns", "list").stdout.split() if ns.startswith(self.prefix)
        ]
        existing = {p.name for p in Path("/sys/class/net").iterdir()}
        names = [self.bridge] + [self.host_veth(i) for i in range(1, self.count + 1)]
        found += [name for name in names if name in existing]
        return [name for name in found if name in set(self.namespaces) | set(names)]

    # -- set-up and teardown -------------------------------------------------------------------

    def setup(self) -> None:
        """Create namespaces, veths, the bridge and the qdiscs.

        Raises:
            TopologyError: a command failed (what was created is removed again).
        """
        self.check_privileges()
        debris = self.leftovers()
        if debris:
            raise TopologyError(
                f"left over from another run (still going, or crashed): {', '.join(debris)}; "
                "stop that run or remove them with --cleanup"
            )
        self._created = True
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for i in range(1, self.count + 1):
                ns, host, inner = self.netns(i), self.host_veth(i), self.ns_veth(i)
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
                _run("ip", "link", "set", inner, "netns", ns)
                _run("ip", "link", "set", host, "master", self.bridge)
                _run("ip", "link", "set", host, "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inner)
                _run("ip", "-n", ns, "link", "set", inner, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                self._cap([], host)  # into the namespace
                self._cap(["ip", "netns", "exec", ns], inner)  # out of the namespace
        except BaseException:
            self.teardown()
            raise
        log.info(
            "topology up: %s on %s, links capped at %s each way",
            ", ".join(f"{n}={a}" for n, a in zip(self.namespaces, self.addresses, strict=True)),
            self.bridge,
            self.rate,
        )

    def _cap(self, prefix: list[str], dev: str) -> None:
        # quantum set explicitly: htb's default (rate / r2q) exceeds its limit at these rates
        _run(
            *prefix,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "handle",
            "1:",
            "htb",
            "default",
            "10",
        )
        _run(
            *prefix,
            "tc",
            "class",
            "add",
            "dev",
            dev,
            "parent",
            "1:",
            "classid",
            "1:10",
            "htb",
            "rate",
            self.rate,
            "ceil",
            self.rate,
            "quantum",
            "60000",
        )

    def teardown(self) -> None:
        """Remove namespaces, veths and bridge (qdiscs go with their devices). Idempotent."""
        existing_ns = set(_run("ip", "netns", "list", check=False).stdout.split())
        for i in range(1, self.count + 1):
            ns = self.netns(i)
            if ns in existing_ns:
                _run("ip", "netns", "del", ns, check=False)
            if Path(f"/sys/class/net/{self.host_veth(i)}").exists():
                _run("ip", "link", "del", self.host_veth(i), check=False)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _run("ip", "link", "del", self.bridge, check=False)
        self._created = False

    def pids(self, i: int) -> list[int]:
        """Processes living in namespace ``i`` (to stop what a run left behind)."""
        result = _run("ip", "netns", "pids", self.netns(i), check=False)
        return [int(p) for p in result.stdout.split() if p.isdigit()]

    # -- counters ------------------------------------------------------------------------------

    def link_bytes(self) -> dict[int, tuple[int, int]]:
        """Per node: (bytes into the namespace, bytes out of it), from the root-side veth."""
        out = {}
        for i in range(1, self.count + 1):
            stats = Path(f"/sys/class/net/{self.host_veth(i)}/statistics")
            # the root-side end transmits what goes into the namespace and receives what leaves
            into = int((stats / "tx_bytes").read_text())
            out_of = int((stats / "rx_bytes").read_text())
            out[i] = (into, out_of)
        return out

    def rate_bytes_per_s(self) -> float:
        """``rate`` in bytes per second (tc units: bit, kbit, mbit, gbit; bps = bytes/s)."""
        text = self.rate.strip().lower()
        units = {
            "gbit": 1e9 / 8,
            "mbit": 1e6 / 8,
            "kbit": 1e3 / 8,
            "bit": 1 / 8,
            "gbps": 1e9,
            "mbps": 1e6,
            "kbps": 1e3,
            "bps": 1.0,
        }
        for unit, factor in units.items():
            if text.endswith(unit):
                return float(text[: -len(unit)]) * factor
        return float(text) / 8  # tc reads a bare number as bit/s
