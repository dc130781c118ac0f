#include "tensors.h"

#include <stdio.h>
#include <string.h>

/* One tensor: tag 40 around [shape, tag 86 around bytes]; returns the rank, or -1 */
static int read_f64(const cbor_item_t *t, uint64_t shape[8], const uint8_t **data, size_t *n)
{
    cbor_item_t *inner, *sh, *typed, *bytes;
    size_t rank, i;
    uint64_t count = 1;
    if (t == NULL || !cbor_isa_tag(t) || cbor_tag_value(t) != TAG_NDARRAY)
        return -1;
    inner = cbor_tag_item(t);
    if (!cbor_isa_array(inner) || cbor_array_size(inner) != 2) {
        cbor_intermediate_decref(inner);
        return -1;
    }
    sh = cbor_array_handle(inner)[0];
    typed = cbor_array_handle(inner)[1];
    cbor_intermediate_decref(inner); /* cbor_tag_item took a reference; the tag keeps one */
    if (!cbor_isa_array(sh) || (rank = cbor_array_size(sh)) > 8 || !cbor_isa_tag(typed) ||
        cbor_tag_value(typed) != TAG_FLOAT64_LE)
        return -1;
    for (i = 0; i < rank; i++) {
        if (!ci_item_uint(cbor_array_handle(sh)[i], &shape[i]))
            return -1;
        count *= shape[i];
    }
    bytes = cbor_tag_item(typed);
    cbor_intermediate_decref(bytes);
    if (!cbor_isa_bytestring(bytes) || !cbor_bytestring_is_definite(bytes) ||
        cbor_bytestring_length(bytes) != count * 8)
        return -1;
    *data = cbor_bytestring_handle(bytes);
    *n = cbor_bytestring_length(bytes);
    return (int)rank;
}

int tensors_decode_softmax(const uint8_t *blob, size_t len, softmax_model *m, char *err,
                           size_t errlen)
{
    struct cbor_load_result res;
    cbor_item_t *set = cbor_load(blob, len, &res);
    uint64_t ws[8], bs[8];
    const uint8_t *wd, *bd;
    size_t wn, bn;
    int rc = -1;
    memset(m, 0, sizeof *m);
    if (set == NULL || res.error.code != CBOR_ERR_NONE) {
        snprintf(err, errlen, "model is not valid CBOR");
        goto out;
    }
    if (!cbor_isa_map(set) || cbor_map_size(set) != 2) {
        snprintf(err, errlen, "model is not a 2-tensor set: this device trains softmax {W, b}");
        goto out;
    }
    if (read_f64(ci_get(set, "W"), ws, &wd, &wn) != 2 || read_f64(ci_get(set, "b"), bs, &bd, &bn) != 1 ||
        bs[0] != ws[1] || ws[0] == 0 || ws[1] == 0 || ws[0] > 1u << 20 || ws[1] > 1u << 16) {
        snprintf(err, errlen, "unsupported model: need float64 W [d, k] and b [k] (softmax)");
        goto out;
    }
    if (model_alloc(m, (uint32_t)ws[0], (uint32_t)ws[1]) != 0) {
        snprintf(err, errlen, "out of memory for the model");
        goto out;
    }
    memcpy(m->W, wd, wn); /* little-endian on the wire and on this host */
    memcpy(m->b, bd, bn);
    rc = 0;
out:
    if (set != NULL)
        cbor_decref(&set);
    return rc;
}

static void put_f64(cbor_out *o, const char *name, const double *v, const uint64_t *shape, int rank)
{
    size_t count = 1;
    int i;
    co_text(o, name);
    co_tag(o, TAG_NDARRAY);
    co_array(o, 2);
    co_array(o, (size_t)rank);
    for (i = 0; i < rank; i++) {
        co_uint(o, shape[i]);
        count *= shape[i];
    }
    co_tag(o, TAG_FLOAT64_LE);
    co_bytes(o, v, count * sizeof(double));
}

void tensors_encode_softmax(cbor_out *o, const softmax_model *m)
{
    uint64_t ws[2] = {m->d, m->k}, bs[1] = {m->k};
    co_map(o, 2);
    put_f64(o, "W", m->W, ws, 2);
    put_f64(o, "b", m->b, bs, 1);
}
