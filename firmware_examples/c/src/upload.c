#include "upload.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chunks.h"
#include "port.h"
#include "sha256.h"

enum { UNSENT, INFLIGHT, ACKED };

void random_xfer(char out[33])
{
    static const char hex[] = "0123456789abcdef";
    uint8_t raw[16];
    int i;
    port_random(raw, sizeof raw);
    for (i = 0; i < 16; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 15];
    }
    out[32] = '\0';
}

int upload_begin(upload *u, cbor_out *payload, size_t csz, const char *task_id)
{
    memset(u, 0, sizeof *u);
    u->payload = *payload;
    memset(payload, 0, sizeof *payload);
    snprintf(u->task_id, sizeof u->task_id, "%s", task_id);
    sha256(u->payload.buf, u->payload.len, u->digest); /* every chunk carries it (6.2 rule 2) */
    random_xfer(u->xfer);
    u->csz = csz;
    u->n = chunk_count(u->payload.len, csz);
    u->state = calloc(u->n, 1);
    u->mids = calloc(u->n, sizeof *u->mids);
    if (u->state == NULL || u->mids == NULL) {
        upload_free(u);
        return -1;
    }
    return 0;
}

void upload_free(upload *u)
{
    co_free(&u->payload);
    free(u->state);
    free(u->mids);
    u->state = NULL;
    u->mids = NULL;
    u->n = u->acked = u->inflight = 0;
}

int64_t upload_next(const upload *u, int window)
{
    uint64_t i;
    if (u->inflight >= (uint64_t)window)
        return -1;
    for (i = 0; i < u->n; i++)
        if (u->state[i] == UNSENT)
            return (int64_t)i;
    return -1;
}

void upload_chunk(const upload *u, uint64_t i, cbor_out *o)
{
    chunk_encode(o, u->xfer, u->payload.buf, u->payload.len, u->csz, u->digest, u->task_id, i);
}

void upload_sent(upload *u, uint64_t i, int mid, size_t bytes)
{
    u->mids[i][1] = u->mids[i][0];
    u->mids[i][0] = mid;
    u->state[i] = INFLIGHT;
    u->inflight++;
    u->bytes_sent += bytes;
}

bool upload_ack(upload *u, int mid)
{
    uint64_t i;
    /* a PUBACK for the publish before a reconnect counts too: the library may have resent it */
    for (i = 0; i < u->n; i++) {
        if (u->state[i] == ACKED || (u->mids[i][0] != mid && u->mids[i][1] != mid))
            continue;
        if (u->state[i] == INFLIGHT)
            u->inflight--;
        u->state[i] = ACKED;
        u->acked++;
        return true;
    }
    return false;
}

uint64_t upload_requeue(upload *u)
{
    uint64_t i, again = 0;
    for (i = 0; i < u->n; i++)
        if (u->state[i] == INFLIGHT) {
            u->state[i] = UNSENT;
            again++;
        }
    u->inflight = 0;
    return again;
}

bool upload_done(const upload *u) { return u->n > 0 && u->acked == u->n; }
