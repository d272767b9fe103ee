/*
 * pw_seal.h - sealed packets (docs/protocol.md, "Packets").
 *
 * XChaCha20-Poly1305 from libsodium, loaded with dlopen("libsodium.so.23")
 * the first time a key is used, so programs that never configure a key (and
 * every program that merely loads libnss_pwserver.so.2) never load it.
 */
#ifndef PW_SEAL_H
#define PW_SEAL_H

#include <stddef.h>
#include <stdint.h>

#include "pw_wire.h"

/* Loads libsodium. Returns 0, or -1 when it is not installed. Thread-safe. */
int pw_seal_available(void);

/* Reads a key file: 64 hex characters and an optional newline. Returns 0 or
 * -1 (missing, unreadable, malformed). */
int pw_read_keyfile(const char *path, uint8_t key[PW_KEY_BYTES]);

/* Parses 64 hex characters (plus optional trailing whitespace). */
int pw_parse_key(const char *text, size_t len, uint8_t key[PW_KEY_BYTES]);

/* Seals `len` bytes of `in` into `out`. Returns the sealed length, or -1
 * (no libsodium, or cap < len + PW_SEAL_OVERHEAD). */
int pw_seal(const uint8_t key[PW_KEY_BYTES], int key_id, const uint8_t *in,
            size_t len, uint8_t *out, size_t cap);

/* The key id of a sealed packet, or 0 when the packet is not sealed. */
int pw_sealed_key_id(const uint8_t *in, size_t len);

/* Opens a sealed packet with `key`. Returns the plain length, or -1 when the
 * packet is malformed or does not authenticate. */
int pw_unseal(const uint8_t key[PW_KEY_BYTES], const uint8_t *in, size_t len,
              uint8_t *out, size_t cap);

#endif /* PW_SEAL_H */
