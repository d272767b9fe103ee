"""The C table and answer path under AddressSanitizer and UBSan: a driver
built here from pwcache/_csrc feeds them random and mutated sources and
packets (seeded), and any memory error or undefined behaviour aborts it."""

import pathlib
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[2] / "pwcache" / "_csrc"
SOURCES = ["pw_wire.c", "pw_seal.c", "pw_placement.c", "pw_table.c", "pw_delta.c", "pw_server.c"]

DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "pw_server.h"
#include "pw_wire.h"

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return n ? (uint32_t)(rng % n) : 0;
}

static const char *pieces[] = {"user", ":", "x", "::", "1000", "\n", ",", " ", "#", "-1", "4294967295",
                               "\xff", "\xc3\xa9", "/bin/sh", "frozen", "host", "+", "", "0", "99999999999"};

/* A buffer of lines built from pieces that look like the files. */
static size_t make_source(char *out, size_t cap)
{
    size_t n = 0, parts = rnd(400);
    for (size_t i = 0; i < parts; i++) {
        const char *p = pieces[rnd(sizeof pieces / sizeof *pieces)];
        size_t k = strlen(p);
        if (rnd(20) == 0) { out[n++] = (char)rnd(256); if (n >= cap) break; continue; }
        if (n + k >= cap) break;
        memcpy(out + n, p, k);
        n += k;
    }
    return n;
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 1000;
    static char src[4][8192];
    static uint8_t out[PW_MAX_TCP_ANSWER + PW_SEAL_OVERHEAD];
    uint8_t key[32] = {1};
    pws_server *s = pws_new();
    pws_set_keys(s, NULL, key);
    int slot = pws_slot_acquire(s);
    pwpl_rule *rule = pwpl_new(PWPL_HASH);
    pwpl_add_host(rule, "a", 1, 1.0);
    pwpl_add_host(rule, "b", 1, 2.0);
    for (int r = 0; r < rounds; r++) {
        size_t len[4];
        for (int i = 0; i < 4; i++)
            len[i] = make_source(src[i], sizeof src[i]);
        char err[128];
        pwt_table *t = pwt_build(src[0], len[0], src[1], len[1], src[2], len[2], src[3], len[3],
                                 r % 2 ? rule : NULL, err, sizeof err);
        if (!t) { fprintf(stderr, "build failed: %s\n", err); return 1; }
        pwt_table *old = pws_swap_table(s, t, (uint64_t)r, 0);
        pwt_free(old);
        for (int q = 0; q < 50; q++) {
            uint8_t pkt[PW_MAX_REQUEST + 8];
            pw_request rq = {.id = rng, .op = (int)rnd(14), .arg_kind = (int)rnd(3), .num = rnd(2000)};
            char name[16];
            snprintf(name, sizeof name, "user%u", rnd(3));
            rq.name = rnd(2) ? name : src[0] + rnd(len[0] + 1) / 2;
            rq.name_len = (uint32_t)(rq.name == name ? strlen(name) : rnd(12));
            if (rq.name != name && rq.name + rq.name_len > src[0] + len[0]) rq.name_len = 0;
            int n = pw_encode_request(pkt, sizeof pkt, &rq, rnd(2) ? 256 : 0);
            if (n < 0) n = 0;
            for (int m = rnd(4); m > 0 && n > 0; m--)  /* mutate */
                pkt[rnd((uint32_t)n)] ^= (uint8_t)(1u << rnd(8));
            if (rnd(4) == 0) n = (int)rnd((uint32_t)n + 1);  /* truncate */
            pws_answer(s, slot, pkt, (size_t)n, 0, out, PW_MAX_UDP_ANSWER);
            pws_answer(s, slot, pkt, (size_t)n, 1, out, sizeof out);
            uint8_t sealed[sizeof pkt + PW_SEAL_OVERHEAD];
            int k = pw_seal(key, PW_KEY_SHADOW, pkt, (size_t)n, sealed, sizeof sealed);
            if (k > 0) {
                if (rnd(3) == 0) sealed[rnd((uint32_t)k)] ^= 1;  /* forged */
                pws_answer(s, slot, sealed, (size_t)k, 0, out, PW_MAX_UDP_ANSWER);
                pws_answer(s, slot, sealed, (size_t)k, 1, out, sizeof out);
            }
        }
    }
    pwt_free(pws_swap_table(s, NULL, 0, 0));
    pws_slot_release(s, slot);
    pws_free(s);
    pwpl_free(rule);
    puts("ok");
    return 0;
}
"""


def run_under_sanitizers(tmp_path, driver_source: str, rounds: int = 3000) -> None:
    """Builds a C driver with the table and server sources under ASan and
    UBSan (any error aborts it), runs it, and checks it said "ok"."""
    driver = tmp_path / "driver.c"
    driver.write_text(driver_source)
    exe = tmp_path / "driver"
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-I",
            str(CSRC),
            str(driver),
            *(str(CSRC / s) for s in SOURCES),
            "-ldl",
            "-lpthread",
            "-lm",
            "-o",
            str(exe),
        ],
        check=True,
    )
    run = subprocess.run([str(exe), str(rounds)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "ok"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_code_under_sanitizers(tmp_path):
    run_under_sanitizers(tmp_path, DRIVER)
