#include "cbor_io.h"

#include <stdlib.h>
#include <string.h>

void co_init(cbor_out *o, size_t cap)
{
    o->buf = malloc(cap ? cap : 64);
    o->cap = o->buf ? (cap ? cap : 64) : 0;
    o->len = 0;
    o->failed = o->buf == NULL;
}

void co_free(cbor_out *o)
{
    free(o->buf);
    o->buf = NULL;
    o->len = o->cap = 0;
}

static bool reserve(cbor_out *o, size_t more)
{
    size_t cap;
    uint8_t *p;
    if (o->failed)
        return false;
    if (o->len + more <= o->cap)
        return true;
    cap = o->cap * 2 > o->len + more ? o->cap * 2 : o->len + more;
    p = realloc(o->buf, cap);
    if (p == NULL) {
        o->failed = true;
        return false;
    }
    o->buf = p;
    o->cap = cap;
    return true;
}

/* every header/number encoder writes at most 9 bytes */
#define HEAD(call)                                                                                 \
    do {                                                                                           \
        if (reserve(o, 9))                                                                         \
            o->len += call;                                                                        \
    } while (0)

void co_map(cbor_out *o, size_t n) { HEAD(cbor_encode_map_start(n, o->buf + o->len, 9)); }
void co_array(cbor_out *o, size_t n) { HEAD(cbor_encode_array_start(n, o->buf + o->len, 9)); }
void co_uint(cbor_out *o, uint64_t v) { HEAD(cbor_encode_uint(v, o->buf + o->len, 9)); }
void co_double(cbor_out *o, double v) { HEAD(cbor_encode_double(v, o->buf + o->len, 9)); }
void co_tag(cbor_out *o, uint64_t tag) { HEAD(cbor_encode_tag(tag, o->buf + o->len, 9)); }

void co_raw(cbor_out *o, const void *data, size_t n)
{
    if (n && reserve(o, n)) {
        memcpy(o->buf + o->len, data, n);
        o->len += n;
    }
}

void co_text(cbor_out *o, const char *s)
{
    size_t n = strlen(s);
    HEAD(cbor_encode_string_start(n, o->buf + o->len, 9));
    co_raw(o, s, n);
}

void co_bytes(cbor_out *o, const void *data, size_t n)
{
    HEAD(cbor_encode_bytestring_start(n, o->buf + o->len, 9));
    co_raw(o, data, n);
}

cbor_item_t *ci_get(const cbor_item_t *map, const char *key)
{
    size_t i, n, klen = strlen(key);
    struct cbor_pair *pairs;
    if (map == NULL || !cbor_isa_map(map))
        return NULL;
    n = cbor_map_size(map);
    pairs = cbor_map_handle(map);
    for (i = 0; i < n; i++) {
        cbor_item_t *k = pairs[i].key;
        if (cbor_isa_string(k) && cbor_string_is_definite(k) && cbor_string_length(k) == klen &&
            memcmp(cbor_string_handle(k), key, klen) == 0)
            return pairs[i].value;
    }
    return NULL;
}

bool ci_text(const cbor_item_t *map, const char *key, char *out, size_t cap)
{
    cbor_item_t *it = ci_get(map, key);
    size_t n;
    if (it == NULL || !cbor_isa_string(it) || !cbor_string_is_definite(it))
        return false;
    n = cbor_string_length(it);
    if (n + 1 > cap)
        return false;
    memcpy(out, cbor_string_handle(it), n);
    out[n] = '\0';
    return strlen(out) == n; /* no embedded NUL */
}

bool ci_item_uint(const cbor_item_t *it, uint64_t *out)
{
    if (it == NULL || !cbor_isa_uint(it))
        return false;
    *out = cbor_get_int(it);
    return true;
}

bool ci_item_num(const cbor_item_t *it, double *out)
{
    if (it == NULL)
        return false;
    if (cbor_isa_uint(it)) {
        *out = (double)cbor_get_int(it);
        return true;
    }
    if (cbor_isa_negint(it)) {
        *out = -1.0 - (double)cbor_get_int(it);
        return true;
    }
    if (cbor_isa_float_ctrl(it) && cbor_float_get_width(it) != CBOR_FLOAT_0) {
        *out = cbor_float_get_float(it); /* half, single and double; never true/false */
        return true;
    }
    return false;
}

bool ci_uint(const cbor_item_t *map, const char *key, uint64_t *out)
{
    return ci_item_uint(ci_get(map, key), out);
}

bool ci_num(const cbor_item_t *map, const char *key, double *out)
{
    return ci_item_num(ci_get(map, key), out);
}

bool ci_bytes(const cbor_item_t *map, const char *key, const uint8_t **data, size_t *n)
{
    cbor_item_t *it = ci_get(map, key);
    if (it == NULL || !cbor_isa_bytestring(it) || !cbor_bytestring_is_definite(it))
        return false;
    *data = cbor_bytestring_handle(it);
    *n = cbor_bytestring_length(it);
    return true;
}
