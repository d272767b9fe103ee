/*
 * pw_seal.c - XChaCha20-Poly1305 sealing through a dlopen'ed libsodium.
 */
#define _GNU_SOURCE
#include "pw_seal.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#define SODIUM_SONAME "libsodium.so.23"

typedef int (*sodium_init_fn)(void);
typedef void (*randombytes_buf_fn)(void *, size_t);
typedef int (*aead_encrypt_fn)(unsigned char *c, unsigned long long *clen,
                               const unsigned char *m, unsigned long long mlen,
                               const unsigned char *ad, unsigned long long adlen,
                               const unsigned char *nsec, const unsigned char *npub,
                               const unsigned char *k);
typedef int (*aead_decrypt_fn)(unsigned char *m, unsigned long long *mlen,
                               unsigned char *nsec, const unsigned char *c,
                               unsigned long long clen, const unsigned char *ad,
                               unsigned long long adlen, const unsigned char *npub,
                               const unsigned char *k);

static struct {
    randombytes_buf_fn random;
    aead_encrypt_fn encrypt;
    aead_decrypt_fn decrypt;
    int ok;
} sodium;

static pthread_once_t sodium_once = PTHREAD_ONCE_INIT;

static void load_sodium(void)
{
    /* RTLD_NODELETE: the functions stay valid even if a caller dlcloses. */
    void *h = dlopen(SODIUM_SONAME, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!h)
        return;
    sodium_init_fn init = (sodium_init_fn)dlsym(h, "sodium_init");
    sodium.random = (randombytes_buf_fn)dlsym(h, "randombytes_buf");
    sodium.encrypt = (aead_encrypt_fn)dlsym(h, "crypto_aead_xchacha20poly1305_ietf_encrypt");
    sodium.decrypt = (aead_decrypt_fn)dlsym(h, "crypto_aead_xchacha20poly1305_ietf_decrypt");
    if (!init || !sodium.random || !sodium.encrypt || !sodium.decrypt)
        return;
    if (init() < 0)
        return;
    sodium.ok = 1;
}

int pw_seal_available(void)
{
    int saved = errno;
    pthread_once(&sodium_once, load_sodium);
    errno = saved;
    return sodium.ok ? 0 : -1;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int pw_parse_key(const char *text, size_t len, uint8_t key[PW_KEY_BYTES])
{
    while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == '\r' ||
                       text[len - 1] == ' ' || text[len - 1] == '\t'))
        len--;
    if (len != 2 * PW_KEY_BYTES)
        return -1;
    for (size_t i = 0; i < PW_KEY_BYTES; i++) {
        int hi = hexval(text[2 * i]), lo = hexval(text[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        key[i] = (uint8_t)(hi << 4 | lo);
    }
    return 0;
}

int pw_read_keyfile(const char *path, uint8_t key[PW_KEY_BYTES])
{
    char text[2 * PW_KEY_BYTES + 8];
    int saved = errno, rc = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd >= 0) {
        ssize_t n = read(fd, text, sizeof text);
        close(fd);
        if (n > 0 && (size_t)n < sizeof text)
            rc = pw_parse_key(text, (size_t)n, key);
        explicit_bzero(text, sizeof text);
    }
    errno = saved;
    return rc;
}

int pw_sealed_key_id(const uint8_t *in, size_t len)
{
    if (len < PW_SEAL_OVERHEAD || in[0] != PW_SEAL_MARK)
        return 0;
    return in[1];
}

int pw_seal(const uint8_t key[PW_KEY_BYTES], int key_id, const uint8_t *in,
            size_t len, uint8_t *out, size_t cap)
{
    unsigned long long clen;
    if (pw_seal_available() < 0 || cap < len + PW_SEAL_OVERHEAD)
        return -1;
    out[0] = PW_SEAL_MARK;
    out[1] = (uint8_t)key_id;
    sodium.random(out + 2, PW_SEAL_NONCE);
    if (sodium.encrypt(out + 2 + PW_SEAL_NONCE, &clen, in, len, out, 2, NULL,
                       out + 2, key) != 0)
        return -1;
    return (int)(2 + PW_SEAL_NONCE + clen);
}

int pw_unseal(const uint8_t key[PW_KEY_BYTES], const uint8_t *in, size_t len,
              uint8_t *out, size_t cap)
{
    unsigned long long mlen;
    if (pw_sealed_key_id(in, len) == 0 || pw_seal_available() < 0)
        return -1;
    if (cap < len - PW_SEAL_OVERHEAD)
        return -1;
    if (sodium.decrypt(out, &mlen, NULL, in + 2 + PW_SEAL_NONCE,
                       len - 2 - PW_SEAL_NONCE, in, 2, in + 2, key) != 0)
        return -1;
    return (int)mlen;
}
