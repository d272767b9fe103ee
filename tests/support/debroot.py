"""Debian packages unpacked into a private root (`apt-get download` and
`dpkg -x`): programs whose package cannot be installed beside ours (Postfix
conflicts with sendmail-bin) or that must not start a system service
(nginx). Nothing is installed on the machine; the root is made once per
cache folder, in a temporary folder renamed into place (tests running at
once see a whole root or none).

    python -m tests.support.debroot postfix     # what `make build` runs

The cache is /var/cache/pwmail-test, or $PWMAIL_DEB_CACHE (every folder
above it must be traversable by the daemons' own users, e.g. Postfix's).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

CACHE = pathlib.Path(os.environ.get("PWMAIL_DEB_CACHE", "/var/cache/pwmail-test"))


def unpacked(name: str, packages: tuple[str, ...], cache: pathlib.Path = CACHE) -> pathlib.Path:
    """The root holding `packages` unpacked (cache/name/root), fetched the first time."""
    root = cache / name / "root"
    if root.is_dir():
        return root
    if not shutil.which("apt-get"):
        raise RuntimeError(f"{name}: apt-get (Debian) is needed to fetch {' '.join(packages)}")
    (cache / name).mkdir(parents=True, exist_ok=True)
    os.chmod(cache / name, 0o755)  # daemons that dropped root still read their libraries
    with tempfile.TemporaryDirectory(dir=cache / name) as tmp:
        debs = pathlib.Path(tmp) / "debs"
        debs.mkdir()
        os.chmod(tmp, 0o755)
        subprocess.run(["apt-get", "download", *packages], cwd=debs, check=True, capture_output=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(pathlib.Path(tmp) / "root")], check=True)
        try:
            os.rename(pathlib.Path(tmp) / "root", root)
        except OSError:
            if not root.is_dir():  # else: another process made it meanwhile
                raise
    return root


PACKAGES = {"postfix": ("postfix",), "nginx": ("nginx", "libnginx-mod-mail")}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(unpacked(name, PACKAGES[name]))
