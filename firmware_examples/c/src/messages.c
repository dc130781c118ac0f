#include "messages.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool segment_ok(const char *s)
{
    size_t n = strlen(s), i;
    if (n < 1 || n > 64)
        return false;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return false;
    }
    return true;
}

static void envelope(cbor_out *o, size_t fields, const char *type)
{
    co_map(o, fields + 2);
    co_text(o, "v");
    co_uint(o, 1);
    co_text(o, "type");
    co_text(o, type);
}

int msg_task_decode(const uint8_t *buf, size_t len, task_msg *t, char *err, size_t errlen)
{
    struct cbor_load_result res;
    cbor_item_t *m = cbor_load(buf, len, &res), *train, *it;
    char type[16];
    const uint8_t *dig;
    size_t dlen;
    uint64_t v;
    const char *colon;
    int rc = -1;
    memset(t, 0, sizeof *t);
    if (m == NULL || res.error.code != CBOR_ERR_NONE || !cbor_isa_map(m)) {
        snprintf(err, errlen, "not a CBOR map");
        goto out;
    }
    if (!ci_uint(m, "v", &v) || v != 1 || !ci_text(m, "type", type, sizeof type) ||
        strcmp(type, "task") != 0) {
        snprintf(err, errlen, "not a v1 task");
        goto out;
    }
    train = ci_get(m, "train");
    if (!ci_text(m, "task_id", t->task_id, sizeof t->task_id) ||
        !ci_text(m, "session", t->session, sizeof t->session) || !ci_uint(m, "round", &t->round) ||
        !ci_text(m, "model_version", t->model_version, sizeof t->model_version) ||
        !ci_bytes(m, "model_digest", &dig, &dlen) || dlen != 32 ||
        !ci_num(m, "deadline", &t->deadline) || train == NULL || !cbor_isa_map(train) ||
        !ci_uint(m, "chunk_size", &t->chunk_size)) {
        snprintf(err, errlen, "a required task field is missing or of the wrong type");
        goto out;
    }
    if (!segment_ok(t->model_version)) {
        snprintf(err, errlen, "model_version %.64s is not a topic segment", t->model_version);
        goto out;
    }
    memcpy(t->model_digest, dig, 32);
    /* "{session}:{round}:{attempt}": the attempt orders retries of one round */
    colon = strrchr(t->task_id, ':');
    if (colon == NULL || colon[1] == '\0' || strspn(colon + 1, "0123456789") != strlen(colon + 1)) {
        snprintf(err, errlen, "task_id %s is not session:round:attempt", t->task_id);
        goto out;
    }
    t->attempt = strtoull(colon + 1, NULL, 10);
    it = ci_get(m, "fence");
    if (it != NULL && !ci_item_uint(it, &t->fence)) {
        snprintf(err, errlen, "fence is not an unsigned integer");
        goto out;
    }
    t->has_package = ci_get(m, "package") != NULL;
    /* train settings, with the reference trainer's defaults */
    t->train.lr = 0.1;
    t->train.batch_size = 32;
    t->train.epochs = 1;
    t->train.mu = 0.0;
    if ((it = ci_get(train, "lr")) != NULL && !ci_item_num(it, &t->train.lr)) {
        snprintf(err, errlen, "train.lr is not a number");
        goto out;
    }
    if ((it = ci_get(train, "batch_size")) != NULL &&
        (!ci_item_uint(it, &v) || v == 0 || v > 1u << 20)) {
        snprintf(err, errlen, "train.batch_size is not a positive integer");
        goto out;
    }
    if (it != NULL)
        t->train.batch_size = (uint32_t)v;
    if ((it = ci_get(train, "epochs")) != NULL && (!ci_item_uint(it, &v) || v > 1000)) {
        snprintf(err, errlen, "train.epochs is not a small non-negative integer");
        goto out;
    }
    if (it != NULL)
        t->train.epochs = (uint32_t)v;
    /* FedProx: a mu that is not a number is a bad task; a negative one is declined later */
    if ((it = ci_get(train, "mu")) != NULL && !ci_item_num(it, &t->train.mu)) {
        snprintf(err, errlen, "train.mu is not a number");
        goto out;
    }
    /* train.model is informational (4.1a): the model's tensor names decide */
    if ((it = ci_get(m, "compression")) != NULL &&
        !ci_text(it, "encoding", t->compression, sizeof t->compression))
        strcpy(t->compression, "?");
    rc = 0;
out:
    if (m != NULL)
        cbor_decref(&m);
    return rc;
}

void msg_status(cbor_out *o, const char *state, double ts, const char *device, const char *region,
                const char *agent)
{
    envelope(o, 3 + (region != NULL) + (agent != NULL), "status");
    co_text(o, "state");
    co_text(o, state);
    co_text(o, "ts");
    co_double(o, ts);
    co_text(o, "device");
    co_text(o, device);
    if (region != NULL) {
        co_text(o, "region");
        co_text(o, region);
    }
    if (agent != NULL) {
        co_text(o, "agent");
        co_text(o, agent);
    }
}

void msg_update(cbor_out *o, const task_msg *t, const char *device, uint32_t num_examples,
                double train_loss, double train_accuracy, const softmax_model *m)
{
    envelope(o, 6, "update");
    co_text(o, "task_id");
    co_text(o, t->task_id);
    co_text(o, "device");
    co_text(o, device);
    co_text(o, "model_version");
    co_text(o, t->model_version);
    co_text(o, "num_examples");
    co_uint(o, num_examples);
    co_text(o, "metrics");
    co_map(o, 2);
    co_text(o, "train_accuracy");
    co_double(o, train_accuracy);
    co_text(o, "train_loss");
    co_double(o, train_loss);
    co_text(o, "tensors");
    tensors_encode_softmax(o, m);
}

void msg_decline(cbor_out *o, const char *task_id, const char *reason)
{
    char r[513];
    snprintf(r, sizeof r, "%s", reason); /* receivers keep at most 512 characters */
    envelope(o, 2, "decline");
    co_text(o, "task_id");
    co_text(o, task_id);
    co_text(o, "reason");
    co_text(o, r);
}

void msg_fetch(cbor_out *o, const char *version)
{
    envelope(o, 1, "fetch");
    co_text(o, "version");
    co_text(o, version);
}

void msg_telemetry(cbor_out *o, double ts, const char *const *names, const double *values, size_t n)
{
    size_t i;
    envelope(o, 2, "telemetry");
    co_text(o, "ts");
    co_double(o, ts);
    co_text(o, "metrics");
    co_map(o, n);
    for (i = 0; i < n; i++) {
        co_text(o, names[i]);
        co_double(o, values[i]);
    }
}
