"""A network namespace joined to this machine by a link with delay and loss, for tests.

    with ShapedLink(delay=0.3, jitter=0.1, loss=0.02) as link:
        link.host_ip        # this side's address (bind the broker here)
        link.exec_prefix    # ["ip", "netns", "exec", NAME]: run a command inside
        link.shaper         # "netem", or "tun" (and link.netem_problem says why)

The link is a veth pair with `tc qdisc ... netem` on both ends (each direction delayed and
lossy), addresses from 10.213.0.0/16 on the two ends only. Kernels built without sch_netem
(some VM and CI kernels) get the same shaping in user space instead: a TUN device on each side
and `tests/netem_shuttle.py` in between, which holds every packet for delay ± jitter and drops
the given share. Everything is removed on exit, also after errors: the namespace (with its end
of the link), this side's interface, the shuttle.

Needs root or CAP_NET_ADMIN, and iproute2 (`ip`, `tc`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import TracebackType

_CAP_NET_ADMIN = 12
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
SHUTTLE = Path(__file__).with_name("netem_shuttle.py")


class NetemUnavailableError(Exception):
    """This machine cannot make the link (no privilege, no tool, no netem and no TUN)."""


def can_admin_network() -> bool:
    """Root, or CAP_NET_ADMIN in the effective set."""
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def missing_tools() -> list[str]:
    return [tool for tool in ("ip", "tc") if shutil.which(tool) is None]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)


def _must(*cmd: str) -> None:
    proc = _run(*cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


class ShapedLink:
    def __init__(self, *, delay: float, jitter: float, loss: float, seed: int = 1) -> None:
        tag = os.getpid() % 100_000
        self.name = f"flnetem{tag}"
        self.host_if, self.ns_if = f"flh{tag}", f"fld{tag}"
        subnet = f"10.213.{tag % 250}"
        self.host_ip, self.ns_ip = f"{subnet}.1", f"{subnet}.2"
        self.delay, self.jitter, self.loss, self.seed = delay, jitter, loss, seed
        self.shaper = ""
        self.netem_problem = ""  # why tc netem was not used, when the user-space shaper is
        self._shuttle: subprocess.Popen[str] | None = None
        self._host_fd: int | None = None

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def __enter__(self) -> ShapedLink:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open(self) -> None:
        _must("ip", "netns", "add", self.name)
        _must("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        if self._try_netem():
            self.shaper = "netem"
        else:
            self._tun()
            self.shaper = "tun"

    def _netem_args(self) -> list[str]:
        return [
            "netem",
            "delay",
            f"{self.delay * 1000:.0f}ms",
            f"{self.jitter * 1000:.0f}ms",
            "loss",
            f"{self.loss * 100:g}%",
        ]

    def _try_netem(self) -> bool:
        """A veth pair with netem on both ends; False if this kernel has no netem qdisc."""
        _must(
            "ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
            "netns", self.name,
        )  # fmt: skip
        probe = _run("tc", "qdisc", "add", "dev", self.host_if, "root", *self._netem_args())
        if probe.returncode != 0:
            self.netem_problem = probe.stderr.strip() or f"tc exited {probe.returncode}"
            _must("ip", "link", "del", self.host_if)  # takes the namespace's end with it
            return False
        ns = self.exec_prefix
        _must(*ns, "tc", "qdisc", "add", "dev", self.ns_if, "root", *self._netem_args())
        _must("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _must("ip", "link", "set", self.host_if, "up")
        _must(*ns, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _must(*ns, "ip", "link", "set", self.ns_if, "up")
        return True

    def _tun(self) -> None:
        """A TUN device on each side and the shuttle between them (no netem in this kernel)."""
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR)
        except OSError as exc:
            raise NetemUnavailableError(f"no netem qdisc and no /dev/net/tun ({exc})") from None
        self._host_fd = fd
        fcntl.ioctl(
            fd, _TUNSETIFF, struct.pack("16sH22x", self.host_if.encode(), _IFF_TUN | _IFF_NO_PI)
        )
        _must("ip", "addr", "add", self.host_ip, "peer", self.ns_ip, "dev", self.host_if)
        _must("ip", "link", "set", self.host_if, "up")
        self._shuttle = subprocess.Popen(
            [
                *self.exec_prefix,
                sys.executable,
                str(SHUTTLE),
                "--name",
                self.ns_if,
                "--host-fd",
                str(fd),
                "--delay",
                str(self.delay),
                "--jitter",
                str(self.jitter),
                "--loss",
                str(self.loss),
                "--seed",
                str(self.seed),
            ],
            pass_fds=(fd,),
            stdin=subprocess.PIPE,  # the shuttle stops when this pipe closes (we are gone)
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self._shuttle.stdout is not None
        ready = self._shuttle.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"netem shuttle did not start: {ready!r}")
        ns = self.exec_prefix
        _must(*ns, "ip", "addr", "add", self.ns_ip, "peer", self.host_ip, "dev", self.ns_if)
        _must(*ns, "ip", "link", "set", self.ns_if, "up")

    def close(self) -> None:
        if self._shuttle is not None:
            self._shuttle.terminate()
            try:
                self._shuttle.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._shuttle.kill()
                self._shuttle.wait(timeout=10)
            for pipe in (self._shuttle.stdin, self._shuttle.stdout):
                if pipe is not None:
                    pipe.close()
            self._shuttle = None
        if self._host_fd is not None:
            os.close(self._host_fd)  # a TUN device goes away with its last descriptor
            self._host_fd = None
        _run("ip", "netns", "del", self.name)
        _run("ip", "link", "del", self.host_if)  # a veth end left behind, if any

    def exists(self) -> bool:
        """Whether any piece of the link is still there (for the test's own cleanup check)."""
        names = _run("ip", "netns", "list").stdout.split()
        return self.name in names or _run("ip", "link", "show", self.host_if).returncode == 0
