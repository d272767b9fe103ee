"""nginx's mail proxy as the peer of pop-proxy in bench_pop.py (--peer nginx).

nginx (Debian's 1.22 with libnginx-mod-mail) is unpacked from the Debian
archive into a cache folder with `apt-get download` and `dpkg -x`
(tests/support/debroot.py, /var/cache/pwmail-test/nginx): nothing
is installed on the machine and no system service starts. It runs one
worker (pop-proxy is one process too), `pop3_auth plain`, a `proxy_buffer`
of 1 MiB (pop-proxy's `relay_buffer`; nginx's default of one page gives
a tenth of the throughput), and answers its
own `auth_http` requests from a `location` in the same worker that sends
every user to the one backend: the cheapest routing nginx can have (a
real deployment asks an HTTP service that looks the user up, which costs
more). nginx logs in to the backend with USER and PASS.
"""

from __future__ import annotations

import pathlib
import socket
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support

from tests.support import debroot  # noqa: E402
from tests.support.pwtest import Process  # noqa: E402


def unpack() -> tuple[pathlib.Path, pathlib.Path]:
    """(the nginx binary, the mail module), fetched once (tests/support/debroot.py)."""
    root = debroot.unpacked("nginx", debroot.PACKAGES["nginx"])
    return root / "usr/sbin/nginx", root / "usr/lib/nginx/modules/ngx_mail_module.so"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


CONFIG = """\
load_module {module};
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {work}/t1; proxy_temp_path {work}/t2; fastcgi_temp_path {work}/t3;
    uwsgi_temp_path {work}/t4; scgi_temp_path {work}/t5;
    server {{
        listen 127.0.0.1:{auth_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server {backend_host};
            add_header Auth-Port {backend_port};
            return 204;
        }}
    }}
}}
mail {{
    auth_http 127.0.0.1:{auth_port}/auth;
    pop3_auth plain;
    proxy_pass_error_message on;
    proxy_buffer {buffer};
    server {{ listen {host}:{port}; protocol pop3; }}
}}
"""


class NginxMailProxy(Process):
    """nginx's POP3 proxy in front of `backend` (HOST, PORT), on `host`."""

    def __init__(
        self,
        work: pathlib.Path,
        backend: tuple[str, int],
        host: str = "127.0.0.1",
        connections: int = 16384,
        buffer: str = "1m",
    ):
        binary, module = unpack()
        work.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, free_port(host)
        conf = work / "nginx.conf"
        conf.write_text(
            CONFIG.format(
                module=module,
                work=work,
                connections=connections,
                auth_port=free_port("127.0.0.1"),
                backend_host=backend[0],
                backend_port=backend[1],
                host=host,
                port=self.port,
                buffer=buffer,
            )
        )
        super().__init__(
            [str(binary), "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")], work / "nginx.out"
        )
        self.wait_until(self._listening, "nginx", timeout=15)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(self.address, timeout=1) as s:
                return s.recv(100).startswith(b"+OK")
        except OSError:
            time.sleep(0.05)
            return False

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port
