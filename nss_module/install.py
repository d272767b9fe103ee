"""`pwmail nss install|uninstall [--dry-run]`: put libnss_pwserver.so.2 in
the system library folder and `pwserver` after `files` on the passwd, group
and shadow lines of /etc/nsswitch.conf (docs/nss.md).

install   copies the library (atomically, mode 0644), runs ldconfig, edits
          nsswitch.conf keeping the original as nsswitch.conf.pwserver-backup;
          running it again changes nothing.
uninstall restores the backup when nsswitch.conf is still exactly what
          install made of it, else removes only the `pwserver` words (the
          admin's later edits stay); removes the library; runs ldconfig.
--dry-run prints the diff and what would be done, and touches nothing.
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

SONAME = "libnss_pwserver.so.2"
SERVICE = "pwserver"
MAPS = ("passwd", "group", "shadow")
NSSWITCH = pathlib.Path("/etc/nsswitch.conf")
BACKUP_SUFFIX = ".pwserver-backup"
HERE = pathlib.Path(__file__).resolve().parent

_LINE = re.compile(r"^(?P<head>\s*(?P<map>[a-z]+)\s*:\s*)(?P<rest>[^#\n]*?)(?P<tail>\s*(#.*)?)$")


def system_libdir() -> pathlib.Path:
    """Where glibc looks for NSS modules: the folder holding libc.so.6."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    candidates = [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"] if multiarch else []
    for d in candidates + ["/usr/lib64", "/lib64", "/usr/lib", "/lib"]:
        if (pathlib.Path(d) / "libc.so.6").exists():
            return pathlib.Path(d)
    raise SystemExit("pwmail nss: cannot find the system library folder (no libc.so.6)")


def _edit_lines(text: str, edit) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        m = _LINE.match(body)
        if m and m["map"] in MAPS:
            words = edit(m["rest"].split())
            if words is not None:
                body = m["head"] + " ".join(words) + m["tail"]
        out.append(body + ("\n" if line.endswith("\n") else ""))
    return "".join(out)


def add_service(text: str) -> str:
    """nsswitch.conf text with `pwserver` after `files` (or `compat`, and
    after any `[...]` action that follows it) on the passwd, group and
    shadow lines; lines that already name it are left alone."""

    def edit(words):
        if SERVICE in words:
            return None
        at = len(words)
        for i, w in enumerate(words):
            if w in ("files", "compat"):
                at = i + 1
                while at < len(words) and words[at].startswith("["):
                    at += 1
                break
        return words[:at] + [SERVICE] + words[at:]

    return _edit_lines(text, edit)


def remove_service(text: str) -> str:
    """nsswitch.conf text without `pwserver` (and its `[...]` actions)."""

    def edit(words):
        if SERVICE not in words:
            return None
        out, skip = [], False
        for w in words:
            if w == SERVICE:
                skip = True
                continue
            if skip and w.startswith("["):
                continue
            skip = False
            out.append(w)
        return out

    return _edit_lines(text, edit)


def _diff(old: str, new: str, path: pathlib.Path) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), str(path), str(path) + " (new)"
        )
    )


def _write_atomic(path: pathlib.Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _ldconfig(libdir: pathlib.Path) -> None:
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if os.path.exists(ldconfig):
        subprocess.run([ldconfig], check=False)


def built_library() -> pathlib.Path:
    lib = HERE / SONAME
    if not lib.exists():
        subprocess.run(["make", "-s", "-C", str(HERE)], check=True)
    return lib


def install(nsswitch: pathlib.Path, libdir: pathlib.Path, dry_run: bool) -> int:
    old = nsswitch.read_text()
    new = add_service(old)
    backup = nsswitch.with_name(nsswitch.name + BACKUP_SUFFIX)
    lib = built_library()
    target = libdir / SONAME
    sys.stdout.write(_diff(old, new, nsswitch) or f"{nsswitch}: already names {SERVICE}\n")
    if dry_run:
        print(f"would copy {lib} to {target} and run ldconfig")
        if new != old and not backup.exists():
            print(f"would keep the original as {backup}")
        return 0
    _write_atomic(target, lib.read_bytes(), 0o644)
    _ldconfig(libdir)
    if new != old:
        if not backup.exists():
            _write_atomic(backup, old.encode(), nsswitch.stat().st_mode & 0o7777)
        _write_atomic(nsswitch, new.encode(), nsswitch.stat().st_mode & 0o7777)
    print(f"installed {target}; {nsswitch} names {SERVICE}")
    return 0


def uninstall(nsswitch: pathlib.Path, libdir: pathlib.Path, dry_run: bool) -> int:
    old = nsswitch.read_text()
    backup = nsswitch.with_name(nsswitch.name + BACKUP_SUFFIX)
    restore = backup.exists() and add_service(backup.read_text()) == old
    new = backup.read_text() if restore else remove_service(old)
    target = libdir / SONAME
    sys.stdout.write(_diff(old, new, nsswitch) or f"{nsswitch}: does not name {SERVICE}\n")
    if dry_run:
        if target.exists():
            print(f"would remove {target} and run ldconfig")
        return 0
    if restore:
        os.replace(backup, nsswitch)
    elif new != old:
        _write_atomic(nsswitch, new.encode(), nsswitch.stat().st_mode & 0o7777)
        if backup.exists():
            print(f"{nsswitch} changed since install: removed {SERVICE} only, kept {backup}")
    if target.exists():
        target.unlink()
        _ldconfig(libdir)
    print(f"uninstalled {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pwmail nss", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("--dry-run", action="store_true", help="print the diff, change nothing")
    p.add_argument("--nsswitch", type=pathlib.Path, default=NSSWITCH, help=argparse.SUPPRESS)
    p.add_argument("--libdir", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    libdir = args.libdir or system_libdir()
    if (
        not args.dry_run
        and os.geteuid() != 0
        and (not os.access(libdir, os.W_OK) or not os.access(args.nsswitch.parent, os.W_OK))
    ):
        print("pwmail nss: must run as root", file=sys.stderr)
        return 1
    action = install if args.action == "install" else uninstall
    return action(args.nsswitch, libdir, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
