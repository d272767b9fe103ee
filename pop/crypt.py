"""Password checks against shadow(5) hashes with libxcrypt's crypt(3).

cffi in ABI mode (no compiler at install time): libcrypt.so.1 is opened at
first use. `crypt_rn` is the reentrant form that returns NULL on failure
instead of a magic "*0" string, so a check can run in a worker thread while
the event loop goes on (cffi releases the GIL during the call).

Accepted hashes are the strong methods libxcrypt offers; yescrypt (`$y$`,
Debian's default) and sha512-crypt (`$6$`) are the ones we test and
document. Locked or disabled entries ("!", "*", "", "!$y$...") never match.
"""

from __future__ import annotations

import hmac
import secrets
import threading

import cffi

_CDEF = """
char *crypt_rn(const char *phrase, const char *setting, void *data, int size);
char *crypt_gensalt_rn(const char *prefix, unsigned long count,
                       const char *rbytes, int nrbytes, char *output, int output_size);
"""
CRYPT_DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt
CRYPT_GENSALT_OUTPUT_SIZE = 192
MAX_PASSWORD = 512  # bytes; longer phrases are refused, not hashed

# Prefixes of the methods we accept (all strong in libxcrypt 4.4).
STRONG_PREFIXES = ("$y$", "$gy$", "$7$", "$6$", "$5$", "$2b$", "$2y$")
# A valid yescrypt hash (libxcrypt's default cost) of a random password
# nobody knows: what check_password() checks a locked account against unless
# told otherwise. pop3d uses a DummyHash (below) shaped like its users' hashes.
DUMMY_HASH = "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$mDNiTHlX8FxoBRzwa2FnNROWHmYo2bAA5te4hP/YUDD"

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_lib = None
_lib_lock = threading.Lock()


class CryptError(Exception):
    """libcrypt could not be loaded or refused the setting."""


def _libcrypt():
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                try:
                    _lib = _ffi.dlopen("libcrypt.so.1")
                except OSError as e:
                    raise CryptError(f"cannot load libcrypt.so.1: {e}") from e
    return _lib


def crypt(phrase: str, setting: str) -> str | None:
    """crypt(3) of `phrase` with `setting` (a salt or a whole hash), or None
    when libcrypt refuses the setting."""
    pw = phrase.encode("utf-8")
    st = setting.encode("ascii")
    if b"\0" in pw or b"\0" in st:
        return None
    data = _ffi.new("char[]", CRYPT_DATA_SIZE)
    out = _libcrypt().crypt_rn(pw, st, data, CRYPT_DATA_SIZE)
    if out == _ffi.NULL:
        return None
    result = _ffi.string(out).decode("ascii")
    return None if result.startswith("*") else result


def hash_password(phrase: str, prefix: str = "$y$", rounds: int = 0) -> str:
    """A new hash of `phrase` (yescrypt by default; "$6$" for sha512-crypt).
    rounds=0 takes libxcrypt's default cost."""
    out = _ffi.new("char[]", CRYPT_GENSALT_OUTPUT_SIZE)
    salt = _libcrypt().crypt_gensalt_rn(prefix.encode(), rounds, _ffi.NULL, 0, out, CRYPT_GENSALT_OUTPUT_SIZE)
    if salt == _ffi.NULL:
        raise CryptError(f"crypt_gensalt refused prefix {prefix!r}")
    result = crypt(phrase, _ffi.string(salt).decode("ascii"))
    if result is None:
        raise CryptError(f"crypt refused prefix {prefix!r}")
    return result


def usable_hash(hashed: str) -> bool:
    """True when `hashed` is a hash a password can match (not locked, not
    empty, a method we accept)."""
    return isinstance(hashed, str) and hashed.startswith(STRONG_PREFIXES)


def check_password(phrase: str, hashed: str | None, dummy: str = DUMMY_HASH) -> bool:
    """True when `phrase` matches the shadow hash `hashed`. When there is
    nothing to match (no user: None, a locked account, a phrase too long),
    `phrase` is checked against `dummy` instead, so that the answer takes
    as long as a real check of that method and cost."""
    if not usable_hash(hashed) or len(phrase.encode("utf-8")) > MAX_PASSWORD:
        crypt(phrase[:MAX_PASSWORD], dummy)
        return False
    result = crypt(phrase, hashed)
    return result is not None and hmac.compare_digest(result.encode(), hashed.encode())


class DummyHash:
    """The hash pop3d checks unknown users against: a real hash of a random
    password nobody knows, with the method and cost of the site's users, so
    that "no such user" takes as long as a wrong password.

    `model`: a hash (or crypt setting) of the site's method and cost, e.g.
    `mkpasswd -m yescrypt -R 7 anything`; its password does not matter.
    Empty: until a real user's hash is seen, libxcrypt's default (yescrypt);
    then the first usable hash learn() is given decides, once. Either way the
    dummy is crypt(random password, model): the same method, cost and salt.
    Raises CryptError for a model libxcrypt refuses or we do not accept.
    """

    def __init__(self, model: str = "") -> None:
        self.settled = bool(model)  # configured, or learned already
        self._lock = threading.Lock()
        self.hash = self._like(model) if model else hash_password(secrets.token_urlsafe(32))

    @staticmethod
    def _like(model: str) -> str:
        result = crypt(secrets.token_urlsafe(32), model) if usable_hash(model) else None
        if result is None:
            raise CryptError(f"not a usable crypt(3) hash or setting: {model[:16]!r}...")
        return result

    def learn(self, real: str | None) -> None:
        """Take the shape of the first real user's usable hash (costs one
        crypt(3) call, once); a configured model is never replaced."""
        if self.settled or not usable_hash(real):
            return
        with self._lock:
            if not self.settled:
                self.hash = self._like(real)
                self.settled = True

    def check(self, phrase: str, hashed: str | None) -> bool:
        """check_password() with this dummy; learns from `hashed` first."""
        self.learn(hashed)
        return check_password(phrase, hashed, self.hash)
