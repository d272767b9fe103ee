"""`pwmail gen-key FILE`: a new network or shadow key (docs/protocol.md,
"Packets"): 32 random bytes as 64 hex characters, mode 0600."""

from __future__ import annotations

import argparse
import os
import sys


def write_key(path: str, force: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (os.urandom(32).hex() + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pwmail gen-key", description=__doc__)
    ap.add_argument("file", help="where to write the key (refuses to overwrite without --force)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = ap.parse_args(argv)
    try:
        write_key(args.file, args.force)
    except FileExistsError:
        print(f"pwmail gen-key: {args.file} exists (use --force to replace it)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pwmail gen-key: {e}", file=sys.stderr)
        return 1
    return 0
