#include "device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chunks.h"
#include "messages.h"
#include "port.h"
#include "sha256.h"
#include "tensors.h"

#define QUEUE 4
#define SEEN 32
#define SESSIONS 8
#define TOPIC_MAX 320

enum state { IDLE, DOWNLOADING, TRAINING, UPLOADING };
enum chunk_state { UNSENT, INFLIGHT, ACKED };

struct device {
    const device_config *cfg;
    const dataset *data;
    edgefl_transport tp;
    bool connected;
    char t_task[TOPIC_MAX], t_update[TOPIC_MAX], t_status[TOPIC_MAX], t_telemetry[TOPIC_MAX],
        t_request[TOPIC_MAX], model_prefix[128];
    cbor_out will;
    /* tasks: a short queue, redelivery filter, and per-session (fence, round, attempt) */
    task_msg queue[QUEUE];
    int qlen;
    char seen[SEEN][TASK_ID_MAX];
    int seen_next;
    struct {
        char session[TASK_ID_MAX];
        uint64_t key[3];
    } latest[SESSIONS];
    int latest_next;
    enum state state;
    task_msg cur;
    /* the model last downloaded, kept for retries of a round */
    bool have_model;
    char model_version[ID_MAX];
    uint8_t model_digest[32];
    softmax_model model;
    /* the download in progress */
    download dl;
    char dl_prefix[TOPIC_MAX], dl_filter[TOPIC_MAX + 2];
    double dl_give_up, next_fetch;
    uint64_t bytes_received;
    /* the upload in progress: acknowledged chunks survive a reconnect */
    cbor_out up;
    uint8_t up_digest[32];
    char xfer[33];
    size_t csz;
    uint64_t n, acked, inflight;
    uint8_t *cstate;
    int (*mids)[2]; /* [0] the latest publish of a chunk, [1] the one before a reconnect */
    double up_deadline, next_send, train_s, loss, accuracy;
    uint64_t bytes_sent;
    device_stats stats;
};

static void reset_upload(device *d)
{
    co_free(&d->up);
    free(d->cstate);
    free(d->mids);
    d->cstate = NULL;
    d->mids = NULL;
    d->n = d->acked = d->inflight = 0;
}

device *device_new(const device_config *cfg, const dataset *data, const edgefl_transport *tp)
{
    device *d = calloc(1, sizeof *d);
    char base[TOPIC_MAX - 16]; /* at most 209 characters */
    if (d == NULL)
        return NULL;
    d->cfg = cfg;
    d->data = data;
    d->tp = *tp;
    snprintf(base, sizeof base, "edgefl/v1/%s/%s/dev/%s/", cfg->project, cfg->region, cfg->device);
    snprintf(d->t_task, TOPIC_MAX, "%stask", base);
    snprintf(d->t_update, TOPIC_MAX, "%supdate", base);
    snprintf(d->t_status, TOPIC_MAX, "%sstatus", base);
    snprintf(d->t_telemetry, TOPIC_MAX, "%stelemetry", base);
    snprintf(d->t_request, TOPIC_MAX, "%srequest", base);
    snprintf(d->model_prefix, sizeof d->model_prefix, "edgefl/v1/%s/model/", cfg->project);
    co_init(&d->will, 128);
    msg_status(&d->will, "offline", port_time(), cfg->device, NULL, NULL);
    return d;
}

void device_free(device *d)
{
    if (d == NULL)
        return;
    co_free(&d->will);
    download_free(&d->dl);
    reset_upload(d);
    model_free(&d->model);
    free(d);
}

const char *device_status_topic(const device *d) { return d->t_status; }

const uint8_t *device_will(const device *d, size_t *len)
{
    *len = d->will.len;
    return d->will.buf;
}

device_stats device_get_stats(const device *d) { return d->stats; }

bool device_busy(const device *d) { return d->state != IDLE || d->qlen > 0; }

static int publish(device *d, const char *topic, const cbor_out *o, int qos, bool retain, int *mid)
{
    int dummy;
    if (o->failed) {
        port_log("ERROR", "%s: out of memory encoding a message for %s", d->cfg->device, topic);
        return -1;
    }
    return d->tp.publish(d->tp.ctx, topic, o->buf, o->len, qos, retain, mid ? mid : &dummy);
}

static void announce(device *d)
{
    cbor_out o;
    co_init(&o, 128);
    msg_status(&o, "online", port_time(), d->cfg->device, d->cfg->region, AGENT_VERSION);
    publish(d, d->t_status, &o, 1, true, NULL);
    co_free(&o);
}

static void random_hex(char *out, size_t nbytes)
{
    static const char hex[] = "0123456789abcdef";
    uint8_t raw[32];
    size_t i;
    port_random(raw, nbytes);
    for (i = 0; i < nbytes; i++) {
        out[2 * i] = hex[raw[i] >> 4];
        out[2 * i + 1] = hex[raw[i] & 15];
    }
    out[2 * nbytes] = '\0';
}

/* A decline travels like an update: one chunked transfer on the update topic (4.2a). */
static void decline(device *d, const task_msg *t, const char *reason)
{
    cbor_out msg, ch;
    uint8_t digest[32];
    char xfer[33];
    port_log("WARN", "%s: declining %s: %s", d->cfg->device, t->task_id, reason);
    d->stats.declined++;
    if (port_time() > t->deadline)
        return; /* the round is over anyway */
    co_init(&msg, 256);
    msg_decline(&msg, t->task_id, reason);
    sha256(msg.buf, msg.len, digest);
    random_hex(xfer, 16);
    co_init(&ch, msg.len + 256);
    chunk_encode(&ch, xfer, msg.buf, msg.len, msg.len > MIN_CHUNK ? msg.len : MIN_CHUNK, digest,
                 t->task_id, 0);
    publish(d, d->t_update, &ch, 1, false, NULL);
    co_free(&ch);
    co_free(&msg);
}

/* ---- tasks ------------------------------------------------------------------------- */

static int cmp_key(const uint64_t a[3], const uint64_t b[3])
{
    int i;
    for (i = 0; i < 3; i++)
        if (a[i] != b[i])
            return a[i] < b[i] ? -1 : 1;
    return 0;
}

static void on_task(device *d, const uint8_t *payload, size_t len)
{
    task_msg t;
    char err[160];
    uint64_t key[3];
    int i, slot = -1;
    if (msg_task_decode(payload, len, &t, err, sizeof err) != 0) {
        port_log("WARN", "%s: ignoring bad task: %s", d->cfg->device, err);
        return;
    }
    for (i = 0; i < SEEN; i++)
        if (strcmp(d->seen[i], t.task_id) == 0)
            return; /* QoS 1 redelivery */
    key[0] = t.fence;
    key[1] = t.round;
    key[2] = t.attempt;
    for (i = 0; i < SESSIONS; i++)
        if (strcmp(d->latest[i].session, t.session) == 0)
            slot = i;
    if (slot >= 0 && cmp_key(key, d->latest[slot].key) <= 0) {
        port_log("WARN", "%s: dropping stale task %s", d->cfg->device, t.task_id);
        return; /* a replay, or a plan from a controller that lost the session */
    }
    if (slot < 0) {
        slot = d->latest_next;
        d->latest_next = (d->latest_next + 1) % SESSIONS;
        strcpy(d->latest[slot].session, t.session);
    }
    memcpy(d->latest[slot].key, key, sizeof key);
    strcpy(d->seen[d->seen_next], t.task_id);
    d->seen_next = (d->seen_next + 1) % SEEN;
    if (d->qlen == QUEUE) { /* the oldest waiting task is the least useful */
        memmove(d->queue, d->queue + 1, sizeof(task_msg) * (QUEUE - 1));
        d->qlen--;
    }
    d->queue[d->qlen++] = t;
    if (d->cfg->verbose)
        port_log("INFO", "%s: task %s (model %s)", d->cfg->device, t.task_id, t.model_version);
}

static void end_download(device *d)
{
    if (d->connected)
        d->tp.unsubscribe(d->tp.ctx, d->dl_filter);
    download_free(&d->dl);
}

static void start_task(device *d)
{
    task_msg *t = &d->cur;
    char why[200];
    double now = port_time(), left;
    *t = d->queue[0];
    memmove(d->queue, d->queue + 1, sizeof(task_msg) * (QUEUE - 1));
    d->qlen--;
    if (now > t->deadline) {
        port_log("WARN", "%s: task %s arrived after its deadline; skipped", d->cfg->device, t->task_id);
        return;
    }
    if (d->data->n == 0) {
        decline(d, t, "no local data");
        return;
    }
    if (strcmp(t->model_kind, "softmax") != 0) {
        snprintf(why, sizeof why, "this C device trains softmax regression, not %s", t->model_kind);
        decline(d, t, why);
        return;
    }
    if (d->have_model && strcmp(d->model_version, t->model_version) == 0 &&
        memcmp(d->model_digest, t->model_digest, 32) == 0) {
        d->state = TRAINING; /* a retry of the round: same model */
        return;
    }
    d->have_model = false;
    model_free(&d->model); /* the old model goes before the new one arrives */
    download_init(&d->dl, t->model_digest, d->cfg->max_model);
    snprintf(d->dl_prefix, TOPIC_MAX, "%s%s/", d->model_prefix, t->model_version);
    snprintf(d->dl_filter, sizeof d->dl_filter, "%s+", d->dl_prefix);
    left = t->deadline - now;
    d->dl_give_up = port_monotonic() +
                    (left < d->cfg->download_timeout_s ? left : d->cfg->download_timeout_s);
    d->next_fetch = port_monotonic() + d->cfg->fetch_after_s;
    d->state = DOWNLOADING;
    if (d->connected)
        d->tp.subscribe(d->tp.ctx, d->dl_filter, 1);
}

static void on_model_chunk(device *d, const uint8_t *payload, size_t len)
{
    chunk_msg c;
    char err[200];
    int rc;
    if (chunk_parse(payload, len, MAX_CHUNK, &c, err, sizeof err) != 0) {
        port_log("WARN", "%s: bad model chunk: %s", d->cfg->device, err);
        return;
    }
    d->next_fetch = port_monotonic() + d->cfg->fetch_after_s;
    rc = download_feed(&d->dl, &c, err, sizeof err);
    chunk_free(&c);
    if (rc == 0)
        return;
    if (rc < 0) {
        end_download(d);
        d->state = IDLE;
        d->stats.failed++;
        decline(d, &d->cur, err);
        return;
    }
    d->bytes_received += d->dl.size;
    rc = tensors_decode_softmax(d->dl.buf, d->dl.size, &d->model, err, sizeof err);
    end_download(d);
    if (rc != 0) {
        d->state = IDLE;
        decline(d, &d->cur, err);
        return;
    }
    d->have_model = true;
    strcpy(d->model_version, d->cur.model_version);
    memcpy(d->model_digest, d->cur.model_digest, 32);
    d->state = TRAINING;
}

/* ---- training and upload ------------------------------------------------------------ */

static void train_and_start_upload(device *d)
{
    const task_msg *t = &d->cur;
    softmax_model w;
    char why[200];
    double t0;
    size_t csz;
    if (d->model.d != d->data->d) {
        snprintf(why, sizeof why, "local data has %u features, the model %u", d->data->d, d->model.d);
        decline(d, t, why);
        d->state = IDLE;
        return;
    }
    if (model_alloc(&w, d->model.d, d->model.k) != 0) {
        decline(d, t, "out of memory for training");
        d->state = IDLE;
        return;
    }
    memcpy(w.W, d->model.W, sizeof(double) * w.d * w.k);
    memcpy(w.b, d->model.b, sizeof(double) * w.k);
    t0 = port_monotonic();
    if (train_softmax(&w, d->data, d->cfg->seed, (uint32_t)t->round, &t->train) != 0) {
        model_free(&w);
        decline(d, t, "training failed: a label exceeds the model's classes, or out of memory");
        d->state = IDLE;
        return;
    }
    d->train_s = port_monotonic() - t0;
    evaluate_softmax(&w, d->data, &d->loss, &d->accuracy);
    reset_upload(d);
    co_init(&d->up, (size_t)w.d * w.k * 8 + 1024);
    msg_update(&d->up, t, d->cfg->device, d->data->n, d->loss, d->accuracy, &w);
    model_free(&w);
    if (d->up.failed) {
        decline(d, t, "out of memory encoding the update");
        d->state = IDLE;
        return;
    }
    sha256(d->up.buf, d->up.len, d->up_digest);
    random_hex(d->xfer, 16);
    csz = t->chunk_size < d->cfg->max_chunk ? (size_t)t->chunk_size : d->cfg->max_chunk;
    d->csz = csz < MIN_CHUNK ? MIN_CHUNK : csz;
    d->n = chunk_count(d->up.len, d->csz);
    d->cstate = calloc(d->n, 1);
    d->mids = calloc(d->n, sizeof *d->mids);
    if (d->cstate == NULL || d->mids == NULL) {
        reset_upload(d);
        decline(d, t, "out of memory for the upload");
        d->state = IDLE;
        return;
    }
    d->bytes_sent = 0;
    d->up_deadline = t->deadline + 30; /* stop waiting for PUBACKs then (section 9) */
    d->next_send = 0;
    d->state = UPLOADING;
    port_log("INFO", "%s: upload %s started: %llu chunks of %zu bytes for %s (train %.3f s, loss %.4f)",
             d->cfg->device, d->xfer, (unsigned long long)d->n, d->csz, t->task_id, d->train_s,
             d->loss);
}

static void finish_upload(device *d)
{
    static const char *const names[] = {"train_s", "examples", "update_bytes", "bytes_sent",
                                        "bytes_received", "train_loss", "train_accuracy"};
    double values[7];
    cbor_out o;
    values[0] = d->train_s;
    values[1] = d->data->n;
    values[2] = (double)d->up.len;
    values[3] = (double)d->bytes_sent;
    values[4] = (double)d->bytes_received;
    values[5] = d->loss;
    values[6] = d->accuracy;
    co_init(&o, 256);
    msg_telemetry(&o, port_time(), names, values, 7);
    publish(d, d->t_telemetry, &o, 0, false, NULL);
    co_free(&o);
    port_log("INFO", "%s: upload %s acknowledged (%s)", d->cfg->device, d->xfer, d->cur.task_id);
    d->bytes_received = 0;
    d->stats.completed++;
    reset_upload(d);
    d->state = IDLE;
}

static void pump_upload(device *d)
{
    double now = port_monotonic();
    uint64_t i;
    if (port_time() > d->up_deadline) {
        port_log("ERROR", "%s: upload of %s not acknowledged in time", d->cfg->device, d->cur.task_id);
        d->stats.failed++;
        reset_upload(d);
        d->state = IDLE;
        return;
    }
    for (i = 0; i < d->n && d->connected && d->inflight < (uint64_t)d->cfg->window; i++) {
        cbor_out o;
        int mid = 0;
        if (d->cstate[i] != UNSENT)
            continue;
        if (now < d->next_send)
            break;
        co_init(&o, d->csz + 512);
        chunk_encode(&o, d->xfer, d->up.buf, d->up.len, d->csz, d->up_digest, d->cur.task_id, i);
        if (publish(d, d->t_update, &o, 1, false, &mid) == 0) {
            d->mids[i][1] = d->mids[i][0];
            d->mids[i][0] = mid;
            d->cstate[i] = INFLIGHT;
            d->inflight++;
            d->bytes_sent += o.len;
        }
        co_free(&o);
        if (d->cfg->chunk_delay_ms > 0) {
            d->next_send = now + d->cfg->chunk_delay_ms / 1000.0;
            break;
        }
    }
    if (d->acked == d->n)
        finish_upload(d);
}

/* ---- events -------------------------------------------------------------------------- */

void device_on_connect(device *d)
{
    uint64_t i, resend = 0;
    d->connected = true;
    /* after every CONNACK: retained online status, then the subscriptions (section 1.2) */
    announce(d);
    d->tp.subscribe(d->tp.ctx, d->t_task, 1);
    if (d->state == DOWNLOADING)
        d->tp.subscribe(d->tp.ctx, d->dl_filter, 1);
    if (d->state == UPLOADING) {
        /* resume: chunks without a PUBACK go again under the same xfer (section 6.2 rule 6);
         * the receiver ignores the duplicates this may create */
        for (i = 0; i < d->n; i++)
            if (d->cstate[i] == INFLIGHT) {
                d->cstate[i] = UNSENT;
                resend++;
            }
        d->inflight = 0;
        d->stats.resumed_uploads++;
        port_log("INFO", "%s: resuming upload %s: %llu of %llu chunks acknowledged, resending %llu",
                 d->cfg->device, d->xfer, (unsigned long long)d->acked, (unsigned long long)d->n,
                 (unsigned long long)resend);
    }
}

void device_on_disconnect(device *d) { d->connected = false; }

void device_on_message(device *d, const char *topic, const uint8_t *payload, size_t len)
{
    if (len == 0)
        return; /* a cleared retained message, not a message */
    if (strcmp(topic, d->t_task) == 0)
        on_task(d, payload, len);
    else if (d->state == DOWNLOADING && strncmp(topic, d->dl_prefix, strlen(d->dl_prefix)) == 0)
        on_model_chunk(d, payload, len);
}

void device_on_puback(device *d, int mid)
{
    uint64_t i;
    if (d->state != UPLOADING)
        return;
    for (i = 0; i < d->n; i++) {
        if (d->cstate[i] == ACKED || (d->mids[i][0] != mid && d->mids[i][1] != mid))
            continue;
        if (d->cstate[i] == INFLIGHT)
            d->inflight--;
        d->cstate[i] = ACKED;
        d->acked++;
        return;
    }
}

void device_poll(device *d)
{
    switch (d->state) {
    case IDLE:
        if (d->qlen > 0)
            start_task(d);
        break;
    case DOWNLOADING:
        if (d->qlen > 0) { /* the round moved on: take the newer task */
            port_log("WARN", "%s: gave up on %s: a newer task is waiting", d->cfg->device,
                     d->cur.model_version);
            end_download(d);
            d->state = IDLE;
        } else if (port_monotonic() >= d->dl_give_up) {
            char why[160];
            end_download(d);
            d->state = IDLE;
            d->stats.failed++;
            snprintf(why, sizeof why, "model %s did not arrive in time", d->cur.model_version);
            decline(d, &d->cur, why);
        } else if (port_monotonic() >= d->next_fetch && d->connected) {
            cbor_out o; /* the broker may have lost the retained chunks: ask (4.2b) */
            co_init(&o, 128);
            msg_fetch(&o, d->cur.model_version);
            publish(d, d->t_request, &o, 1, false, NULL);
            co_free(&o);
            d->next_fetch = port_monotonic() + d->cfg->fetch_after_s;
        }
        break;
    case TRAINING:
        train_and_start_upload(d);
        break;
    case UPLOADING:
        pump_upload(d);
        break;
    }
}

int device_goodbye(device *d, int *mid)
{
    cbor_out o;
    int rc;
    co_init(&o, 128);
    msg_status(&o, "offline", port_time(), d->cfg->device, NULL, NULL);
    rc = publish(d, d->t_status, &o, 1, true, mid);
    co_free(&o);
    return rc;
}
