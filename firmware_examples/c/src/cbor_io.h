/* Small helpers over libcbor: a growable encoder and field look-ups by name.
 *
 * Encoding uses libcbor's streaming encoders (no item tree), so an update is written once,
 * straight into the buffer that is then cut into chunks. Decoding uses cbor_load's item tree:
 * control messages are small, and a model's tensor bytes are read in place.
 */
#ifndef EDGEFL_CBOR_IO_H
#define EDGEFL_CBOR_IO_H

#include <cbor.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint8_t *buf;
    size_t len, cap;
    bool failed; /* out of memory: the result must not be used */
} cbor_out;

void co_init(cbor_out *o, size_t cap);
void co_free(cbor_out *o);
void co_map(cbor_out *o, size_t n);
void co_array(cbor_out *o, size_t n);
void co_uint(cbor_out *o, uint64_t v);
void co_double(cbor_out *o, double v);
void co_tag(cbor_out *o, uint64_t tag);
void co_text(cbor_out *o, const char *s);
void co_bytes(cbor_out *o, const void *data, size_t n);
void co_raw(cbor_out *o, const void *data, size_t n);

/* Look-ups: NULL when the map lacks the key (or the item is not a map). */
cbor_item_t *ci_get(const cbor_item_t *map, const char *key);
/* Typed getters: false when absent or of the wrong type (booleans are never numbers). */
bool ci_text(const cbor_item_t *map, const char *key, char *out, size_t cap);
bool ci_uint(const cbor_item_t *map, const char *key, uint64_t *out);
bool ci_num(const cbor_item_t *map, const char *key, double *out);
/* a definite byte string: pointer into the item, no copy */
bool ci_bytes(const cbor_item_t *map, const char *key, const uint8_t **data, size_t *n);
bool ci_item_uint(const cbor_item_t *it, uint64_t *out);
bool ci_item_num(const cbor_item_t *it, double *out);

#endif
