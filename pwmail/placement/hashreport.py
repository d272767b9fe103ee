"""`pwmail hash-report`: how evenly each mailbox layout scheme spreads login
names over directories (the paper's IV.1 and Fig. 4).

For each scheme the report gives the directories used (leaf directories
that hold at least one mailbox), the mean and largest number of mailboxes
per used directory, and the coefficient of variation (population standard
deviation / mean) of mailboxes per used directory: 0 is perfectly even.
A lookup in a directory costs time with its size, so the largest directory
is the figure that matters most; the paper's III.C hashing exists to keep
it small.

Schemes: those of `delivery.layout` (first3, first2last, firstlast2,
hash2) plus two more for comparison, defined here only (delivery does not
serve them): `first2` (two levels, 1st and 2nd character) and `last3`
(the last, next-to-last and third-from-last characters: login names that
end in digits spread on the digits).

Name lists: `--users FILE` (a passwd(5) file or one name a line),
`--generate N` (the names of `pwmail gen-users`), or `--faker LOCALE`
(`--count N` Faker names turned into login names the way an ISP hands them
out: see `isp_logins`). Several lists may be given; each is reported.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import statistics
import sys
import unicodedata
from dataclasses import dataclass

from delivery.layout import SCHEMES as LAYOUT_SCHEMES
from delivery.layout import LayoutError, levels

EXTRA_SCHEMES = ("first2", "last3")
ALL_SCHEMES = LAYOUT_SCHEMES + EXTRA_SCHEMES
MAX_LOGIN = 16  # a common ISP limit for login names


def leaf_dir(name: str, scheme: str) -> str:
    """The directory (relative to the root) that holds the user's mailbox."""
    if scheme == "first2":
        parts = [name[:1], name[1:2]]
    elif scheme == "last3":
        parts = [name[-1:], name[-2:-1], name[-3:-2]]
    else:
        return "/".join(levels(name, scheme))
    return "/".join(p for p in parts if p and p != ".")


@dataclass
class SchemeStats:
    scheme: str
    users: int
    dirs: int
    mean: float
    largest: int
    cv: float
    sizes: list[int]  # mailboxes per used directory, largest first

    def row(self) -> list[str]:
        return [self.scheme, f"{self.users}", f"{self.dirs}", f"{self.mean:.1f}", f"{self.largest}", f"{self.cv:.2f}"]


def measure(names: list[str], scheme: str) -> SchemeStats:
    counts: collections.Counter[str] = collections.Counter()
    for n in names:
        counts[leaf_dir(n, scheme)] += 1
    sizes = sorted(counts.values(), reverse=True)
    mean = len(names) / len(sizes) if sizes else 0.0
    cv = statistics.pstdev(sizes) / mean if len(sizes) > 1 and mean else 0.0
    return SchemeStats(scheme, len(names), len(sizes), mean, sizes[0] if sizes else 0, cv, sizes)


# -- name lists -----------------------------------------------------------


def ascii_login(text: str) -> str:
    """Lowercase ASCII letters only ("Núñez" -> "nunez", "De la Cruz" -> "delacruz")."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z]", "", folded.lower())


def isp_logins(people: list[tuple[str, str]], rng: random.Random) -> list[str]:
    """Login names from (first name, last name) pairs, as ISPs build them:
    most often initial + surname (`jperez`), else `juan.perez`, `juanp` or
    `perezj`; a taken name gets the lowest free number appended
    (`jperez2`), and some customers pick a year (`jperez1984`)."""
    taken: set[str] = set()
    out = []
    for first, last in people:
        first_login, last_login = ascii_login(first), ascii_login(last)
        if not first_login or not last_login:
            continue
        r = rng.random()
        if r < 0.6:
            base = first_login[0] + last_login
        elif r < 0.75:
            base = f"{first_login}.{last_login}"
        elif r < 0.9:
            base = first_login + last_login[0]
        else:
            base = last_login + first_login[0]
        base = base[: MAX_LOGIN - 4]
        if rng.random() < 0.1:
            base += str(rng.randrange(1950, 2010))
        cand, k = base, 1
        while cand in taken:
            k += 1
            cand = f"{base}{k}"
        taken.add(cand)
        out.append(cand)
    return out


def faker_names(locale: str, count: int, seed: int = 1) -> list[str]:
    from faker import Faker  # optional dependency (test extras)

    fake = Faker(locale)
    fake.seed_instance(seed)
    people = [(fake.first_name(), fake.last_name()) for _ in range(count)]
    return isp_logins(people, random.Random(seed))


def generated_names(count: int, seed: int = 1) -> list[str]:
    from pwmail.genusers import make_names

    return make_names(count, random.Random(seed))


def read_names(path: str) -> list[str]:
    """Names from a passwd(5) file or a file of one name a line."""
    names = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            names.append(line.split(":", 1)[0].split()[0])
    return names


def usable(names: list[str]) -> tuple[list[str], int]:
    """The names a layout accepts, and how many were refused."""
    ok = []
    for n in names:
        try:
            levels(n, "first3")
        except LayoutError:
            continue
        ok.append(n)
    return ok, len(names) - len(ok)


# -- output ---------------------------------------------------------------

HEADER = ["scheme", "users", "dirs used", "mean/dir", "largest", "CV"]


def markdown_table(stats: list[SchemeStats]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(s.row()) + " |" for s in stats]
    return "\n".join(lines)


def chart(results: dict[str, list[SchemeStats]], path: str) -> None:
    """Fig. 4 again: per name list, mailboxes per directory against the
    directory's rank (largest first, log-log), one line per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.5), squeeze=False)
    for ax, (title, stats) in zip(axes[0], results.items()):
        for s in stats:
            ax.loglog(
                range(1, len(s.sizes) + 1), s.sizes, label=f"{s.scheme} (max {s.largest}, CV {s.cv:.2f})", linewidth=1.4
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("directory rank (largest first)")
        ax.set_ylabel("mailboxes in the directory")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Mailboxes per directory by hashing scheme (cf. the paper's Fig. 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pwmail hash-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--users", action="append", default=[], metavar="FILE", help="passwd file or one name a line (repeatable)"
    )
    ap.add_argument("--generate", type=int, metavar="N", help="N names as `pwmail gen-users` makes them")
    ap.add_argument(
        "--faker",
        action="append",
        default=[],
        metavar="LOCALE",
        help="Faker locale for ISP-style login names, e.g. es_AR, en_US (repeatable; needs Faker)",
    )
    ap.add_argument("--count", type=int, default=100_000, help="names per Faker locale (default 100000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--scheme", action="append", choices=ALL_SCHEMES, help="scheme to compare (repeatable; default all)"
    )
    ap.add_argument("--png", metavar="FILE", help="write the chart there (needs matplotlib)")
    args = ap.parse_args(argv)
    schemes = args.scheme or list(ALL_SCHEMES)
    lists: dict[str, list[str]] = {}
    try:
        for path in args.users:
            lists[path] = read_names(path)
        if args.generate:
            lists[f"gen-users ({args.generate})"] = generated_names(args.generate, args.seed)
        for loc in args.faker:
            lists[f"Faker {loc} ({args.count})"] = faker_names(loc, args.count, args.seed)
    except (OSError, ImportError, AttributeError) as e:
        print(f"pwmail hash-report: {e}", file=sys.stderr)
        return 1
    if not lists:
        ap.error("give --users, --generate or --faker")
    results: dict[str, list[SchemeStats]] = {}
    for title, names in lists.items():
        names, refused = usable(names)
        if not names:
            print(f"pwmail hash-report: {title}: no usable names", file=sys.stderr)
            return 1
        results[title] = [measure(names, s) for s in schemes]
        note = f", {refused} names refused by the layout" if refused else ""
        print(f"### {title}: {len(names)} names{note}\n")
        print(markdown_table(results[title]))
        print()
    if args.png:
        chart(results, args.png)
        print(f"chart: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
