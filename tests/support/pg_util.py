"""A real PostgreSQL 15 for the tests (Debian's postgresql-15), in a folder
of its own: initdb and the server run as `nobody` (uid/gid 65534, through
setpriv: PostgreSQL refuses to run as root), the Unix socket in that folder,
TCP on a free loopback port. Nothing is added to the machine's /etc/passwd.
Stopped by its PID (`pg_ctl stop` first, SIGKILL if it does not stop)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

from tests.support.pwtest import BIN, free_port, wait_for

PG_BIN = pathlib.Path(os.environ.get("PWMAIL_PG_BIN", "/usr/lib/postgresql/15/bin"))
NOBODY = 65534
SUPERUSER = "pwmail"  # initdb's bootstrap role (runs as OS user nobody)
START_TIMEOUT = 60.0  # seconds: generous, the machine is shared


def available() -> bool:
    return (PG_BIN / "initdb").exists() and shutil.which("setpriv") is not None and os.geteuid() == 0


class PostgresServer:
    def __init__(self) -> None:
        # tempfile.mkdtemp, not pytest's tmp_path: nobody must be able to reach it
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="pwmail-pg-"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.pid: int | None = None

    def _as_nobody(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        return subprocess.run(
            cmd,
            check=True,
            capture_output=True,
            text=True,
            cwd=self.root,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            **kw,
        )

    def start(self) -> PostgresServer:
        for d in (self.data, self.sock):
            d.mkdir()
            os.chown(d, NOBODY, NOBODY)
        self.log.touch()
        os.chown(self.log, NOBODY, NOBODY)
        self._as_nobody(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.sock} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_nobody(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            opts,
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
            timeout=START_TIMEOUT + 30,
        )
        pidfile = self.data / "postmaster.pid"
        self.pid = int(
            wait_for(
                lambda: pidfile.exists() and pidfile.read_text().split("\n", 1)[0],
                timeout=START_TIMEOUT,
                describe=self.log.read_text,
            )
        )

    def pause(self) -> None:
        """Stops the server (`pg_ctl stop -m fast`: sessions are cut) until resume()."""
        self._as_nobody(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        self.pid = None

    def resume(self) -> None:
        self._pg_ctl_start()

    def uri(self, dbname: str) -> str:
        """The database as a postgresql:// URI (pwserver --source)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        pidfile = self.data / "postmaster.pid"
        if self.pid is None and pidfile.exists():  # start() failed after the server came up
            self.pid = int(pidfile.read_text().split("\n", 1)[0])
        if self.pid is not None:
            try:
                self._as_nobody(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
            except (subprocess.SubprocessError, OSError):
                pass
            try:
                os.kill(self.pid, 0)
                os.kill(self.pid, signal.SIGKILL)
                time.sleep(0.5)
            except ProcessLookupError:
                pass
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)


def pwmail(*args: str, stdin: str = "", conf: str = "/nonexistent/pwmail.toml") -> subprocess.CompletedProcess:
    """The `pwmail` tool, settings from `conf` (none by default)."""
    env = dict(os.environ, PWMAIL_CONF=conf)
    return subprocess.run(
        [str(BIN / "pwmail"), *args], input=stdin, capture_output=True, text=True, env=env, timeout=300
    )


def user(dsn: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`pwmail user --db DSN ...`"""
    return pwmail("user", "--db", dsn, *args, stdin=stdin)
