"""A private network of Linux network namespaces for multi-host tests.

Each "host" is a network namespace with its own ``eth0`` (a veth pair) plugged into a
bridge that lives in one more namespace (the switch), so nothing is added to the
machine's own network namespace and two test runs never see each other. Everything
is named ``gcd<pid>-...`` and removed by :meth:`NetnsLab.close` (processes first, then
namespaces, which takes their veths with them); stale labs of dead test processes
are removed on the next start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

_PREFIX = "gcd"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or ``None`` when they can."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"{_PREFIX}{os.getpid()}-probe"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"'ip netns add' failed here: {result.stderr.strip()}"
    try:
        link = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if link.returncode != 0:
            return f"cannot create a bridge inside a namespace: {link.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def remove_stale_labs() -> None:
    """Delete namespaces left by test processes that no longer run (killed runs)."""
    listing = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({_PREFIX}(\d+)-\S+)", listing, re.M):
        full, pid = name
        if not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", full, check=False)


class NetnsLab:
    """Hosts on one private /24: ``lab.add_host("scheduler") -> "10.77.0.2"``."""

    _count = 0

    def __init__(self, subnet: str = "10.77.0") -> None:
        NetnsLab._count += 1
        self.tag = f"{_PREFIX}{os.getpid()}-{NetnsLab._count}"
        self.subnet = subnet
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self.hosts: dict[str, str] = {}
        try:
            self.switch = self._add_namespace("sw")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "NetnsLab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace_names(self) -> list[str]:
        """This lab's namespaces as ``ip netns list`` shows them now."""
        listing = _ip("netns", "list", check=False).stdout
        return [line.split()[0] for line in listing.splitlines() if line.startswith(f"{self.tag}-")]

    def _add_namespace(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def add_host(self, host: str) -> str:
        """Make a namespace with ``eth0`` on the lab's bridge; returns its IPv4 address."""
        index = len(self.hosts) + 2
        namespace = self._add_namespace(host)
        port = f"p{index}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        address = f"{self.subnet}.{index}"
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        self.hosts[host] = address
        return address

    def popen(self, host: str, argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace (own process group, output to ``log``)."""
        handle = open(log, "wb")
        try:
            process = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], env=env,
                                       stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            handle.close()
        self.processes.append(process)
        return process

    def run(self, host: str, argv: list[str], *, env: dict[str, str], timeout: float
            ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``host``'s namespace and wait (killed after ``timeout`` s)."""
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        self.processes.append(process)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            out, err = process.communicate()
            err += f"\n[killed after {timeout} s]"
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def stop(self, process: subprocess.Popen) -> None:
        _stop(process)

    def close(self) -> None:
        for process in reversed(self.processes):
            _stop(process)
        self.processes.clear()
        for name in reversed(self.namespaces):
            _ip("netns", "del", name, check=False)
        self.namespaces.clear()


def _stop(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
