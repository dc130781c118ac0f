/* One chunked upload (protocol 6.2) and which of its chunks the broker has acknowledged.
 *
 * Each chunk is UNSENT, IN FLIGHT (published, with its message id) or ACKED (its PUBACK
 * arrived). After a reconnect the chunks in flight go back to UNSENT and are published
 * again under the same xfer: acknowledged chunks are never resent, unacknowledged ones always.
 */
#ifndef EDGEFL_UPLOAD_H
#define EDGEFL_UPLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbor_io.h"
#include "messages.h"

typedef struct {
    cbor_out payload;     /* the encoded message, owned */
    uint8_t digest[32];
    char xfer[33];
    char task_id[TASK_ID_MAX];
    size_t csz;
    uint64_t n, acked, inflight, bytes_sent;
    uint8_t *state;
    int (*mids)[2];       /* [0] the chunk's latest publish, [1] the one before a reconnect */
} upload;

/* 32 random hex digits: a fresh transfer id */
void random_xfer(char out[33]);
/* Take over payload (left empty); 0, or -1 when out of memory. */
int upload_begin(upload *u, cbor_out *payload, size_t csz, const char *task_id);
void upload_free(upload *u);
/* The next chunk to publish with at most `window` in flight, or -1. */
int64_t upload_next(const upload *u, int window);
void upload_chunk(const upload *u, uint64_t i, cbor_out *o);
void upload_sent(upload *u, uint64_t i, int mid, size_t bytes);
/* A PUBACK: true when it acknowledged one of this upload's chunks. */
bool upload_ack(upload *u, int mid);
/* After a reconnect: chunks in flight are to be sent again. Returns how many. */
uint64_t upload_requeue(upload *u);
bool upload_done(const upload *u);

#endif
