/* Chunked transfer (protocol section 6): chunk messages, model download, upload bookkeeping. */
#ifndef EDGEFL_CHUNKS_H
#define EDGEFL_CHUNKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbor_io.h"

#define MIN_CHUNK 1024
#define MAX_CHUNK (8u * 1024 * 1024)
#define XFER_MAX 129

/* One parsed chunk; data points into item, so free it with chunk_free when done. */
typedef struct {
    cbor_item_t *item;
    char xfer[XFER_MAX];
    uint64_t i, n, size, csz;
    const uint8_t *digest;
    const uint8_t *data;
    size_t data_len;
} chunk_msg;

/* Parse and check a chunk against rule 1 of 6.3. 0, or -1 with why. */
int chunk_parse(const uint8_t *buf, size_t len, size_t max_chunk, chunk_msg *c, char *err,
                size_t errlen);
void chunk_free(chunk_msg *c);
/* Encode chunk i of payload (meta = {"task_id": task_id}, or {} when task_id is NULL). */
void chunk_encode(cbor_out *o, const char *xfer, const uint8_t *payload, size_t size, size_t csz,
                  const uint8_t digest[32], const char *task_id, uint64_t i);
uint64_t chunk_count(size_t size, size_t csz);

/* Reassembly of one download (the model), whose digest the task announced. */
typedef struct {
    uint8_t digest[32];
    uint8_t *buf, *have;
    uint64_t n, size, csz, got;
    size_t max_payload;
    bool started;
} download;

void download_init(download *d, const uint8_t digest[32], size_t max_payload);
/* 0: more to come; 1: complete and verified (d->buf holds d->size bytes); -1: failed (why). */
int download_feed(download *d, const chunk_msg *c, char *err, size_t errlen);
void download_free(download *d);

#endif
