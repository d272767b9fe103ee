"""Hosts for whole-system tests and the demo.

`TestBed` makes each host a network namespace on one private bridge (see
docs/testbed.md); `LoopbackBed` gives the same interface with plain loopback
addresses (127.77.0.x) for machines where namespaces are not allowed, at the
cost of `cut`/`restore`.

Names are `pwtb<pid>-<n>-<host>` (plus `pwtb<pid>-<n>-sw` for the bridge), so two beds
never collide, and namespaces left by a run that died are found by prefix
and removed by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "pwtb"
# Exists only inside the bed's namespaces: no route to it from the machine.
SUBNET = "10.77.0.0/24"
LOOPBACK_SUBNET = "127.77.0.0/24"
SYSLOG_HOST = "log1"
SYSLOG_PORT = 5514
IFACE = "eth0"
STOP_GRACE_S = 5.0
IP_TIMEOUT_S = 20.0
_serial = itertools.count()


class BedUnavailable(Exception):
    """This machine cannot run a namespace test bed (the reason is the text)."""


def _ip(
    *args: str,
    ns: str | None = None,
    batch: Sequence[str] | None = None,
    timeout: float = IP_TIMEOUT_S,
    check: bool = True,
) -> str:
    """Run `ip` (iproute2), bounded in time; its output. `batch`: commands
    run by one `ip -batch -`. (Each call is a short process with a timeout:
    a netlink request that never gets its answer cannot hang the bed.)"""
    argv = ["ip"] + (["-n", ns] if ns else []) + (["-batch", "-"] if batch is not None else list(args))
    try:
        r = subprocess.run(
            argv,
            input="".join(line + "\n" for line in batch) if batch is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv)} did not finish within {timeout} s") from None
    if check and r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}"
            + (f"\ncommands: {list(batch)}" if batch is not None else "")
        )
    return r.stdout


def namespace_support() -> str | None:
    """None when network namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or use LoopbackBed)"
    if shutil.which("ip") is None:
        return "the `ip` command (Debian iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError) as e:
        return f"cannot create a network namespace here: {e}"
    with contextlib.suppress(Exception):
        _ip("netns", "delete", probe)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    """Processes in namespace ns, never this one (a thread of ours may be
    inside it for a moment)."""
    out = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _remove_ns(ns: str) -> None:
    """Remove a namespace of ours; whatever still runs in it was started by
    a bed (children that left their process group) and goes with it."""
    for pid in _ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        _ip("netns", "delete", ns)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces of earlier runs whose process is gone (and whatever
    still runs inside them, which those runs started). Returns their names."""
    removed = []
    for ns in list_namespaces():
        m = re.match(rf"^{re.escape(prefix)}(\d+)-", ns)
        if not m or _pid_alive(int(m.group(1))):
            continue
        _remove_ns(ns)
        removed.append(ns)
    return removed


@dataclass
class Proc:
    """A process the bed started on one of its hosts."""

    host: str
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    log: Path
    popen: subprocess.Popen | None = None
    starts: int = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class _Host:
    name: str
    addr: str
    dir: Path
    ns: str | None = None
    port: str | None = None  # bridge-side veth name (TestBed)
    cut: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)


class _Bed:
    """Process management shared by both beds."""

    __test__ = False  # not a pytest test class
    subnet = SUBNET

    def __init__(
        self, hosts: Sequence[str], *, workdir: str | os.PathLike | None = None, keep: bool = False, syslog: bool = True
    ):
        if len(set(hosts)) != len(hosts):
            raise ValueError(f"duplicate host names in {list(hosts)}")
        net = ipaddress.ip_network(self.subnet)
        if len(hosts) > net.num_addresses - 3:
            raise ValueError(f"too many hosts for {self.subnet}")
        for h in hosts:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", h):
                raise ValueError(f"bad host name {h!r} (a-z0-9, at most 12, starting with a letter)")
        self.tag = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.keep = keep
        self.want_syslog = syslog and SYSLOG_HOST in hosts
        self.syslog_address: str | None = None
        self.hosts: dict[str, _Host] = {}
        for i, h in enumerate(hosts):
            d = self.workdir / h
            d.mkdir(parents=True, exist_ok=True)
            self.hosts[h] = _Host(h, str(net.network_address + 2 + i), d)
        self._up = False

    # -- lifecycle -------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self) -> None:
        self._make_hosts()
        self._up = True
        if self.want_syslog:
            self.start_syslog()

    def close(self) -> None:
        """Stop every process, remove every namespace and (unless keep) the
        work folder. Safe to call twice and after a partial start."""
        for h in self.hosts.values():
            for p in h.procs.values():
                self._stop(p, signal.SIGTERM)
        self._remove_hosts()
        self._up = False
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- hosts -----------------------------------------------------------
    def addr(self, host: str) -> str:
        return self._host(host).addr

    def dir(self, host: str) -> Path:
        """A private folder for the host's files (configs, mail roots, logs)."""
        return self._host(host).dir

    def names(self) -> list[str]:
        return list(self.hosts)

    def host_of(self, addr: str) -> str | None:
        for h in self.hosts.values():
            if h.addr == addr:
                return h.name
        return None

    def _host(self, host: str) -> _Host:
        try:
            return self.hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this bed (hosts: {', '.join(self.hosts)})") from None

    # -- processes -------------------------------------------------------
    def env_for(self, host: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["PWMAIL_TESTBED_HOST"] = host
        if self.syslog_address:
            env["PWMAIL_SYSLOG"] = self.syslog_address
        env.update(extra or {})
        return env

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.Popen:
        """Start argv on `host` in the background, stdout and stderr to
        `dir(host)/<name>.log`; `name` (default: the program's base name)
        is what kill/restart/wait_for take."""
        h = self._host(host)
        name = name or os.path.basename(argv[0])
        old = h.procs.get(name)
        if old is not None and old.running():
            raise RuntimeError(f"{name} already runs on {host} (pid {old.pid})")
        p = Proc(host, name, list(argv), self.env_for(host, env), str(cwd) if cwd else None, h.dir / f"{name}.log")
        h.procs[name] = p
        self._launch(p)
        return p.popen

    def _launch(self, p: Proc) -> None:
        with open(p.log, "ab") as log:
            p.popen = subprocess.Popen(
                self._wrap(p.host, p.argv),
                env=p.env,
                cwd=p.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        p.starts += 1

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float = 30.0,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run argv on `host`, wait for it (bounded), capture its output."""
        text = isinstance(input, str)
        return subprocess.run(
            self._wrap(host, argv),
            env=self.env_for(host, env),
            input=input,
            capture_output=True,
            timeout=timeout,
            text=text,
            cwd=cwd,
        )

    def proc(self, host: str, name: str) -> Proc:
        try:
            return self._host(host).procs[name]
        except KeyError:
            raise KeyError(f"no process {name!r} started on {host}") from None

    def kill(self, host: str, name: str, sig: int = signal.SIGTERM, timeout: float = STOP_GRACE_S) -> int | None:
        """Send sig to the process group of `name` on host and wait for it
        (SIGKILL after timeout). Returns its exit status."""
        return self._stop(self.proc(host, name), sig, timeout)

    def send_signal(self, host: str, name: str, sig: int) -> None:
        """Send sig to the process group of `name` on host, without waiting
        (SIGHUP for a reload, SIGSTOP/SIGCONT for a hang)."""
        p = self.proc(host, name)
        if not p.running():
            raise RuntimeError(f"{name} on {host} is not running")
        os.killpg(p.popen.pid, sig)

    def restart(self, host: str, name: str, sig: int = signal.SIGTERM) -> subprocess.Popen:
        """Stop `name` (if it runs) and start it again with the same argv and env."""
        p = self.proc(host, name)
        self._stop(p, sig)
        self._launch(p)
        return p.popen

    def _stop(self, p: Proc, sig: int, timeout: float = STOP_GRACE_S) -> int | None:
        if p.popen is None:
            return None
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, sig)
            try:
                p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(timeout)
        # Anything the process left in its group (children) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, signal.SIGKILL)
        return p.popen.returncode

    def output(self, host: str, name: str) -> str:
        p = self.proc(host, name)
        try:
            return p.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, host: str, name: str, pattern: str, timeout: float = 20.0) -> re.Match:
        """Wait until the output of `name` matches pattern (regex). Raises
        RuntimeError with the output if the process exits or time runs out."""
        p = self.proc(host, name)
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            out = self.output(host, name)
            m = rx.search(out)
            if m:
                return m
            if not p.running():
                raise RuntimeError(
                    f"{name} on {host} exited ({p.popen.returncode if p.popen else None}) "
                    f"before printing {pattern!r}; output:\n{out[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} on {host} did not print {pattern!r} within {timeout}s; output:\n{out[-3000:]}"
                )
            time.sleep(0.05)

    def write_on_script(self, env: dict[str, dict[str, str]] | None = None) -> Path:
        """Write `<workdir>/on`: `on HOST COMMAND...` runs a command on a
        host of this bed the way `run` does (namespace, /etc overlay), with
        that host's extra environment (env[host]) and PWMAIL_SYSLOG."""
        lines = [
            "#!/bin/sh",
            "# on HOST COMMAND...: run COMMAND on a host of this test bed",
            'host="$1"; shift',
            'case "$host" in',
        ]
        for h in self.hosts:
            extra = dict(env.get(h, {}) if env else {})
            if self.syslog_address:
                extra["PWMAIL_SYSLOG"] = self.syslog_address
            exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in extra.items())
            lines.append(f'  {h}) {exports}exec {shlex.join(self._wrap(h, []))} "$@";;')
        lines += [f'  *) echo "hosts: {" ".join(self.hosts)}" >&2; exit 2;;', "esac", ""]
        path = self.workdir / "on"
        path.write_text("\n".join(lines))
        path.chmod(0o755)
        return path

    # -- sockets from this process ----------------------------------------
    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Sockets created in this block (in this thread) belong to `host`'s
        network: e.g. `with bed.inside("client"): poplib.POP3(...)`."""
        self._host(host)
        yield

    def connect(self, host: str, addr: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from `host` to addr:port."""
        with self.inside(host):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        except BaseException:
            s.close()
            raise
        return s

    def udp_socket(self, host: str) -> socket.socket:
        with self.inside(host):
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def wait_port(
        self, host: str, addr: str, port: int, timeout: float = 20.0, proc: tuple[str, str] | None = None
    ) -> None:
        """Wait until a TCP connection from host to addr:port succeeds.
        proc=(host, name): give up at once, with its output, if it exits."""
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and not self.proc(*proc).running():
                p = self.proc(*proc)
                raise RuntimeError(
                    f"{p.name} on {p.host} exited ({p.popen.returncode}) while starting:\n{self.output(*proc)[-3000:]}"
                )
            try:
                self.connect(host, addr, port, timeout=1.0).close()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    out = f"; output:\n{self.output(*proc)[-3000:]}" if proc else ""
                    raise RuntimeError(f"{addr}:{port} not reachable from {host} within {timeout}s: {e}{out}") from e
                time.sleep(0.05)

    # -- central log -----------------------------------------------------
    def start_syslog(self, host: str = SYSLOG_HOST, port: int = SYSLOG_PORT) -> str:
        """Start the syslog collector on host; every process started after
        this gets PWMAIL_SYSLOG pointing at it. Returns HOST:PORT."""
        addr = self.addr(host)
        names = [f"--name={h.addr}={h.name}" for h in self.hosts.values()]
        self.run(
            host,
            [
                sys.executable,
                str(Path(__file__).with_name("syslogd.py")),
                "--listen",
                f"{addr}:{port}",
                "--out",
                str(self.syslog_file(host)),
            ]
            + names,
            name="syslogd",
        )
        self.wait_for(host, "syslogd", r"syslogd: ready on")
        self.syslog_address = f"{addr}:{port}"
        return self.syslog_address

    def syslog_file(self, host: str = SYSLOG_HOST) -> Path:
        return self.dir(host) / "messages"

    def log_lines(self, host: str = SYSLOG_HOST) -> list[str]:
        try:
            return self.syslog_file(host).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    # -- links (TestBed only) ---------------------------------------------
    def cut(self, host: str) -> None:
        raise NotImplementedError("cutting a link needs network namespaces (TestBed, as root)")

    def restore(self, host: str) -> None:
        raise NotImplementedError("restoring a link needs network namespaces (TestBed, as root)")

    # -- per-backend ------------------------------------------------------
    def _make_hosts(self) -> None:
        raise NotImplementedError

    def _remove_hosts(self) -> None:
        raise NotImplementedError

    def _wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        raise NotImplementedError


class TestBed(_Bed):
    """Hosts as network namespaces on one bridge, addresses from SUBNET.

        with TestBed(["pw1", "pw2", "mx1", "store1", "log1"]) as bed:
            bed.run("pw1", ["pwserver", "--listen", f"{bed.addr('pw1')}:7773", ...])
            bed.cut("pw1"); ...; bed.restore("pw1")

    The bridge lives in a namespace of its own (`<tag>-sw`), so nothing is
    added to the machine's own network. Every host has loopback up and
    permanent neighbour entries for every other host, so a cut link is
    silent: senders time out, nothing is refused or reported unreachable.
    """

    def __init__(self, hosts: Sequence[str], **kw):
        reason = namespace_support()
        if reason:
            raise BedUnavailable(reason)
        super().__init__(hosts, **kw)
        self.switch = f"{self.tag}-sw"
        for h in self.hosts.values():
            h.ns = f"{self.tag}-{h.name}"
            h.port = f"v{h.name}"[:15]
        # Files bind-mounted over /etc/<name> for every process on the bed,
        # in the private mount namespace `ip netns exec` makes (never seen
        # outside). /etc/hosts names every host, so "store1" resolves.
        hosts_file = self.workdir / "etc-hosts"
        hosts_file.write_text(
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "".join(f"{h.addr}\t{h.name}\n" for h in self.hosts.values())
        )
        self.etc: dict[str, Path] = {"hosts": hosts_file}

    def ns(self, host: str) -> str:
        return self._host(host).ns

    def _make_hosts(self) -> None:
        cleanup_stale()
        prefixlen = ipaddress.ip_network(self.subnet).prefixlen
        hosts = list(self.hosts.values())
        _ip(batch=[f"netns add {self.switch}"] + [f"netns add {h.ns}" for h in hosts])
        _ip(
            ns=self.switch,
            batch=["link add br0 type bridge", "link set br0 up"]
            + [f"link add {h.port} type veth peer name {IFACE} netns {h.ns}" for h in hosts]
            + [f"link set {h.port} master br0 up" for h in hosts],
        )
        macs: dict[str, str] = {}
        for h in hosts:
            _ip(ns=h.ns, batch=["link set lo up", f"addr add {h.addr}/{prefixlen} dev {IFACE}", f"link set {IFACE} up"])
            macs[h.name] = json.loads(_ip("-j", "link", "show", IFACE, ns=h.ns))[0]["address"]
        for h in hosts:
            neigh = [
                f"neigh replace {o.addr} lladdr {macs[o.name]} dev {IFACE} nud permanent" for o in hosts if o is not h
            ]
            if neigh:
                _ip(ns=h.ns, batch=neigh)

    def _remove_hosts(self) -> None:
        existing = set(list_namespaces())
        for ns in [h.ns for h in self.hosts.values()] + [self.switch]:
            if ns in existing:
                _remove_ns(ns)

    def _wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        ns = self._host(host).ns
        if not self.etc:
            return ["ip", "netns", "exec", ns, *argv]
        binds = []
        for name, path in self.etc.items():
            if "/" in name or not os.path.exists(f"/etc/{name}"):
                raise ValueError(f"can only overlay an existing file directly in /etc, not {name!r}")
            binds.append(f"mount --bind {shlex.quote(str(path))} /etc/{name}")
        script = " && ".join(binds) + ' && exec "$@"'
        return ["ip", "netns", "exec", ns, "sh", "-c", script, "sh", *argv]

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        # setns() moves the calling thread only; the thread's own namespace
        # is saved and restored, so threads may use this at the same time
        target = os.open(f"/run/netns/{self._host(host).ns}", os.O_RDONLY | os.O_CLOEXEC)
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(saved)
        finally:
            os.close(target)
            os.close(saved)

    def cut(self, host: str) -> None:
        """Drop every packet to and from host, silently (its port leaves the
        bridge: frames go nowhere, no error reaches anyone)."""
        h = self._host(host)
        _ip("link", "set", h.port, "nomaster", ns=self.switch)
        h.cut = True

    def restore(self, host: str) -> None:
        h = self._host(host)
        _ip("link", "set", h.port, "master", "br0", "up", ns=self.switch)
        h.cut = False

    def is_cut(self, host: str) -> bool:
        return self._host(host).cut


class LoopbackBed(_Bed):
    """The same interface on plain loopback addresses (127.77.0.x), for
    machines without namespaces. Processes run on the machine itself; there
    is no link to cut."""

    subnet = LOOPBACK_SUBNET

    def _make_hosts(self) -> None:
        pass

    def _remove_hosts(self) -> None:
        pass

    def _wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        self._host(host)
        return list(argv)
