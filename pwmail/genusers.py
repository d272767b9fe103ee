"""`pwmail gen-users N --out DIR`: realistic synthetic users.

Writes passwd, shadow, group and mailhosts files (formats as in passwd(5),
shadow(5), group(5) and docs/placement.md) plus `passwords`, one
`name cleartext` a line, matching the hashes, for tests and the demo.
`shadow` and `passwords` are written mode 0600 (readable by their owner only).

- login names: first initial + surname + digits, 8 to 12 characters, unique
  (as an ISP hands them out: jgarcia, jgarcia7, jgarcia1984 ...);
- uids from 10000, primary group `mailusers` (gid 10000);
- a few hundred project groups (gids from 20000), each user in 0 to 3;
- password hashes: yescrypt and sha512-crypt at a low cost, drawn from a
  pool of precomputed hashes so that 1,000,000 users take seconds, not hours
  (the pool is the only shortcut: each hash is a real crypt(3) hash of the
  password the `passwords` file gives for that user);
- mailhosts over the `--hosts` list, weighted rendezvous hashing of the name
  (docs/placement.md), so the file agrees with the server's default rule.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import time

PRIVATE_MODE = 0o600  # shadow (hashes) and passwords (cleartext)

SURNAMES = """
garcia rodriguez gonzalez fernandez lopez martinez sanchez perez gomez martin
jimenez ruiz hernandez diaz moreno alvarez munoz romero alonso gutierrez navarro
torres dominguez vazquez ramos gil ramirez serrano blanco suarez molina morales
ortega delgado castro ortiz rubio marin sanz iglesias nunez medina garrido santos
castillo cortes lozano guerrero cano prieto mendez cruz calvo gallego vidal leon
herrera marquez pena flores cabrera campos vega fuentes carrasco diez caballero
reyes nieto aguilar pascual santana herrero lorenzo montero hidalgo gimenez ibanez
ferrer duran santiago benitez mora vicente vargas arias carmona crespo roman pastor
soto saez velasco moya soler parra esteban bravo gallardo rojas pardo acosta
smith johnson williams brown jones miller davis wilson anderson taylor thomas moore
jackson white harris thompson clark lewis robinson walker young allen king wright
scott green baker adams nelson hill campbell mitchell roberts carter phillips evans
turner parker collins edwards stewart morris murphy cook rogers morgan peterson
cooper reed bailey bell kelly howard ward cox richardson wood watson brooks bennett
gray james hughes price sanders myers long ross foster rossi russo ferrari esposito
bianchi romano colombo ricci marino greco bruno gallo conti deluca costa giordano
mancini rizzo lombardi moretti silva souza oliveira pereira lima carvalho ferreira
almeida costa ribeiro martins rocha barbosa cardoso teixeira correia mendes nogueira
""".split()
INITIALS = "aaabcccddeefffgghijjjjklllmmmmnopprrrssstvwxyz"
GIVEN = [
    "Juan",
    "Maria",
    "Jose",
    "Ana",
    "Carlos",
    "Laura",
    "Luis",
    "Sofia",
    "Diego",
    "Lucia",
    "Pablo",
    "Elena",
    "Martin",
    "Paula",
    "Jorge",
    "Carmen",
    "Miguel",
    "Julia",
]

MIN_LEN, MAX_LEN = 8, 12
FIRST_UID = 10000
MAIL_GID = 10000
FIRST_PROJECT_GID = 20000
POOL = 256
DAY = 86400


def _libcrypt():
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    return lib


def hash_pool(rng: random.Random, size: int = POOL) -> list[tuple[str, str]]:
    """(password, hash) pairs: half yescrypt (cost 1), half sha512-crypt
    (1000 rounds). Low costs: this is generated test data."""
    lib = _libcrypt()
    alphabet = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    pool = []
    for i in range(size):
        pw = "".join(rng.choice(alphabet) for _ in range(10))
        prefix, cost = (b"$y$", 1) if i % 2 == 0 else (b"$6$", 1000)
        salt = lib.crypt_gensalt(prefix, cost, os.urandom(16), 16)
        h = lib.crypt(pw.encode(), salt)
        if not salt or not h or h.startswith(b"*"):
            raise RuntimeError("crypt(3) failed: is libxcrypt (libcrypt1) installed?")
        pool.append((pw, h.decode()))
    return pool


def make_names(n: int, rng: random.Random) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        base = rng.choice(INITIALS) + rng.choice(SURNAMES)
        base = base[: MAX_LEN - 1]
        # digits until the name is long enough and unused
        for width in (0, 1, 2, 3, 4):
            if width == 0:
                cand = base
            else:
                cand = base + str(rng.randrange(10 ** (width - 1), 10**width))
            if len(cand) < MIN_LEN or len(cand) > MAX_LEN or cand in seen:
                continue
            seen.add(cand)
            names.append(cand)
            break
    return names


def parse_hosts(text: str) -> list[tuple[str, float]]:
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight = item.partition(":")
        hosts.append((name, float(weight) if weight else 1.0))
    if not hosts:
        raise ValueError("--hosts names no host")
    return hosts


def open_private(path: str):
    """For writing, readable by the owner only (PRIVATE_MODE), even when the
    file was there before with a wider mode: hashes and cleartext passwords."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_MODE)
    os.fchmod(fd, PRIVATE_MODE)
    return os.fdopen(fd, "w")


def generate(
    n: int, out: str, hosts: list[tuple[str, float]], groups: int = 300, seed: int = 1, spool: str = "/var/spool/mail"
) -> dict[str, float]:
    from pwcache.placement import PlacementRule  # the server's default rule
    from pwcache.table import CRule  # the same rule in C: 1,000,000 picks in a second

    t0 = time.monotonic()
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    names = make_names(n, rng)
    pool = hash_pool(rng)
    today = int(time.time() // DAY)
    members: list[list[str]] = [[] for _ in range(groups)]
    rule = CRule(PlacementRule("hash", tuple(hosts)))
    host_names = [h for h, _ in hosts]

    def path(name: str) -> str:
        return f"{spool}/{name[0]}/{name[1]}/{name[2]}/{name}"

    with (
        open(os.path.join(out, "passwd"), "w") as pw,
        open_private(os.path.join(out, "shadow")) as sh,
        open(os.path.join(out, "mailhosts"), "w") as mh,
        open_private(os.path.join(out, "passwords")) as pws,
        rule,
    ):
        mh.write("# user host (pwmail gen-users)\n")
        for i, name in enumerate(names):
            uid = FIRST_UID + i
            given = GIVEN[i % len(GIVEN)]
            password, hashed = pool[i % len(pool)]
            pw.write(
                f"{name}:x:{uid}:{MAIL_GID}:{given} {name[1:].rstrip('0123456789').title()}:"
                f"{path(name)}:/usr/sbin/nologin\n"
            )
            sh.write(f"{name}:{hashed}:{today - (i % 700)}:0:99999:7:::\n")
            pws.write(f"{name} {password}\n")
            mh.write(f"{name} {host_names[rule.pick(name)]}\n")
            for _ in range(i % 4):
                members[rng.randrange(groups)].append(name)
    with open(os.path.join(out, "group"), "w") as gr:
        gr.write(f"mailusers:x:{MAIL_GID}:\n")
        for g in range(groups):
            gr.write(f"proj{g:04d}:x:{FIRST_PROJECT_GID + g}:{','.join(dict.fromkeys(members[g]))}\n")
    return {"users": n, "groups": groups + 1, "seconds": time.monotonic() - t0}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pwmail gen-users", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("count", type=int, help="how many users")
    ap.add_argument("--out", required=True, help="folder for passwd, shadow, group, mailhosts, passwords")
    ap.add_argument(
        "--hosts",
        default="store1,store2",
        help="storage hosts, comma-separated, each optionally HOST:WEIGHT (default: store1,store2)",
    )
    ap.add_argument("--groups", type=int, default=300, help="project groups (default 300)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (same seed, same names)")
    ap.add_argument("--spool", default="/var/spool/mail", help="mail spool root used for home directories")
    args = ap.parse_args(argv)
    if args.count < 1 or args.count > 20_000_000:
        ap.error("count must be between 1 and 20,000,000")
    try:
        info = generate(args.count, args.out, parse_hosts(args.hosts), args.groups, args.seed, args.spool)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"pwmail gen-users: {e}", file=sys.stderr)
        return 1
    print(
        f"pwmail gen-users: {info['users']} users, {info['groups']} groups in {args.out} "
        f"({info['seconds']:.1f} s); shadow and passwords are mode {PRIVATE_MODE:04o} (owner only)"
    )
    return 0
