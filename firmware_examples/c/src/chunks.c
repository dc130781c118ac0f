#include "chunks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sha256.h"

uint64_t chunk_count(size_t size, size_t csz)
{
    uint64_t n = (size + csz - 1) / csz;
    return n ? n : 1;
}

int chunk_parse(const uint8_t *buf, size_t len, size_t max_chunk, chunk_msg *c, char *err,
                size_t errlen)
{
    struct cbor_load_result res;
    uint64_t v, expect;
    char alg[16];
    size_t dlen;
    memset(c, 0, sizeof *c);
    if (len > max_chunk + 4096) {
        snprintf(err, errlen, "chunk message of %zu bytes is too large", len);
        return -1;
    }
    c->item = cbor_load(buf, len, &res);
    if (c->item == NULL || res.error.code != CBOR_ERR_NONE || !cbor_isa_map(c->item)) {
        snprintf(err, errlen, "chunk is not a CBOR map");
        goto bad;
    }
    if (!ci_uint(c->item, "v", &v) || v != 1 || !ci_text(c->item, "alg", alg, sizeof alg) ||
        strcmp(alg, "sha256") != 0) {
        snprintf(err, errlen, "chunk has the wrong v or alg");
        goto bad;
    }
    if (!ci_text(c->item, "xfer", c->xfer, sizeof c->xfer) || c->xfer[0] == '\0' ||
        !ci_uint(c->item, "i", &c->i) || !ci_uint(c->item, "n", &c->n) ||
        !ci_uint(c->item, "size", &c->size) || !ci_uint(c->item, "csz", &c->csz) ||
        !ci_bytes(c->item, "digest", &c->digest, &dlen) ||
        !ci_bytes(c->item, "data", &c->data, &c->data_len)) {
        snprintf(err, errlen, "chunk field missing or of the wrong type");
        goto bad;
    }
    if (dlen != 32) {
        snprintf(err, errlen, "chunk digest is not 32 bytes");
        goto bad;
    }
    if (c->csz == 0 || c->csz > MAX_CHUNK || (c->csz < MIN_CHUNK && !(c->n == 1 && c->csz >= c->size))) {
        snprintf(err, errlen, "chunk csz %llu out of range", (unsigned long long)c->csz);
        goto bad;
    }
    if (c->n != chunk_count(c->size, c->csz) || c->i >= c->n) {
        snprintf(err, errlen, "chunk n/i inconsistent with size and csz");
        goto bad;
    }
    expect = c->i + 1 < c->n ? c->csz : c->size - (c->n - 1) * c->csz;
    if (c->data_len != expect) {
        snprintf(err, errlen, "chunk %llu carries %zu bytes, expected %llu",
                 (unsigned long long)c->i, c->data_len, (unsigned long long)expect);
        goto bad;
    }
    return 0;
bad:
    chunk_free(c);
    return -1;
}

void chunk_free(chunk_msg *c)
{
    if (c->item != NULL)
        cbor_decref(&c->item);
}

void chunk_encode(cbor_out *o, const char *xfer, const uint8_t *payload, size_t size, size_t csz,
                  const uint8_t digest[32], const char *task_id, uint64_t i)
{
    uint64_t n = chunk_count(size, csz);
    size_t off = (size_t)i * csz, len = i + 1 < n ? csz : size - off;
    co_map(o, 10);
    co_text(o, "v");
    co_uint(o, 1);
    co_text(o, "xfer");
    co_text(o, xfer);
    co_text(o, "i");
    co_uint(o, i);
    co_text(o, "n");
    co_uint(o, n);
    co_text(o, "size");
    co_uint(o, size);
    co_text(o, "csz");
    co_uint(o, csz);
    co_text(o, "alg");
    co_text(o, "sha256");
    co_text(o, "digest");
    co_bytes(o, digest, 32);
    co_text(o, "meta");
    co_map(o, task_id != NULL);
    if (task_id != NULL) {
        co_text(o, "task_id");
        co_text(o, task_id);
    }
    co_text(o, "data");
    co_bytes(o, payload + off, len);
}

void download_init(download *d, const uint8_t digest[32], size_t max_payload)
{
    memset(d, 0, sizeof *d);
    memcpy(d->digest, digest, 32);
    d->max_payload = max_payload;
}

void download_free(download *d)
{
    free(d->buf);
    free(d->have);
    d->buf = d->have = NULL;
    d->started = false;
}

int download_feed(download *d, const chunk_msg *c, char *err, size_t errlen)
{
    uint8_t got[32];
    if (memcmp(c->digest, d->digest, 32) != 0) {
        /* rule 2: the task announced the digest; another model under this version ends it */
        snprintf(err, errlen, "model chunk digest differs from the task's model_digest");
        return -1;
    }
    if (!d->started) {
        if (c->size > d->max_payload) {
            snprintf(err, errlen, "model of %llu bytes exceeds this device's %zu",
                     (unsigned long long)c->size, d->max_payload);
            return -1;
        }
        d->n = c->n;
        d->size = c->size;
        d->csz = c->csz;
        d->buf = malloc(c->size + 1);
        d->have = calloc(c->n, 1);
        if (d->buf == NULL || d->have == NULL) {
            snprintf(err, errlen, "out of memory for a %llu-byte model", (unsigned long long)c->size);
            return -1;
        }
        d->started = true;
    } else if (c->n != d->n || c->size != d->size || c->csz != d->csz) {
        return 0; /* disagrees with the transfer: rejected, the transfer goes on */
    }
    if (d->have[c->i])
        return 0; /* duplicate: the first copy wins */
    memcpy(d->buf + c->i * d->csz, c->data, c->data_len);
    d->have[c->i] = 1;
    if (++d->got < d->n)
        return 0;
    sha256(d->buf, d->size, got);
    if (memcmp(got, d->digest, 32) != 0) {
        snprintf(err, errlen, "model payload does not match its digest");
        return -1;
    }
    return 1;
}
