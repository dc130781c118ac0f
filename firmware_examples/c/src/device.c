#include "device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chunks.h"
#include "messages.h"
#include "port.h"
#include "sha256.h"
#include "tensors.h"
#include "upload.h"

#define QUEUE 4
#define SEEN 32
#define SESSIONS 8
#define TOPIC_MAX 320

enum state { IDLE, DOWNLOADING, TRAINING, UPLOADING };

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
    upload up;
    double up_deadline, next_send, train_s, loss, accuracy;
    device_stats stats;
};

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
    upload_free(&d->up);
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
    random_xfer(xfer);
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
    if (t->compression[0] != '\0') { /* a device that cannot MUST decline (5a) */
        snprintf(why, sizeof why, "update compression '%s' is not supported by this device",
                 t->compression);
        decline(d, t, why);
        return;
    }
    if (!(t->train.mu >= 0 && t->train.mu < 1e300)) {
        snprintf(why, sizeof why, "train.mu must be finite and >= 0, got %g", t->train.mu);
        decline(d, t, why);
        return;
    }
    if (d->data->n == 0) {
        decline(d, t, "no local data");
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
    cbor_out update;
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
    co_init(&update, (size_t)w.d * w.k * 8 + 1024);
    msg_update(&update, t, d->cfg->device, d->data->n, d->loss, d->accuracy, &w);
    model_free(&w);
    csz = t->chunk_size < d->cfg->max_chunk ? (size_t)t->chunk_size : d->cfg->max_chunk;
    if (update.failed || upload_begin(&d->up, &update, csz < MIN_CHUNK ? MIN_CHUNK : csz,
                                      t->task_id) != 0) {
        co_free(&update);
        decline(d, t, "out of memory for the update");
        d->state = IDLE;
        return;
    }
    d->up_deadline = t->deadline + 30; /* stop waiting for PUBACKs then (section 9) */
    d->next_send = 0;
    d->state = UPLOADING;
    port_log("INFO", "%s: upload %s started: %llu chunks of %zu bytes for %s (train %.3f s, loss %.4f)",
             d->cfg->device, d->up.xfer, (unsigned long long)d->up.n, d->up.csz, t->task_id,
             d->train_s, d->loss);
}

static void finish_upload(device *d)
{
    static const char *const names[] = {"train_s", "examples", "update_bytes", "bytes_sent",
                                        "bytes_received", "train_loss", "train_accuracy"};
    double values[7];
    cbor_out o;
    values[0] = d->train_s;
    values[1] = d->data->n;
    values[2] = (double)d->up.payload.len;
    values[3] = (double)d->up.bytes_sent;
    values[4] = (double)d->bytes_received;
    values[5] = d->loss;
    values[6] = d->accuracy;
    co_init(&o, 256);
    msg_telemetry(&o, port_time(), names, values, 7);
    publish(d, d->t_telemetry, &o, 0, false, NULL);
    co_free(&o);
    port_log("INFO", "%s: upload %s acknowledged (%s)", d->cfg->device, d->up.xfer, d->cur.task_id);
    d->bytes_received = 0;
    d->stats.completed++;
    upload_free(&d->up);
    d->state = IDLE;
}

static void pump_upload(device *d)
{
    int64_t i;
    if (port_time() > d->up_deadline) {
        port_log("ERROR", "%s: upload of %s not acknowledged in time", d->cfg->device, d->cur.task_id);
        d->stats.failed++;
        upload_free(&d->up);
        d->state = IDLE;
        return;
    }
    while (d->connected && port_monotonic() >= d->next_send &&
           (i = upload_next(&d->up, d->cfg->window)) >= 0) {
        cbor_out o;
        int mid = 0, rc;
        co_init(&o, d->up.csz + 512);
        upload_chunk(&d->up, (uint64_t)i, &o);
        rc = publish(d, d->t_update, &o, 1, false, &mid);
        if (rc == 0)
            upload_sent(&d->up, (uint64_t)i, mid, o.len);
        co_free(&o);
        if (rc != 0)
            break; /* try again at the next poll */
        if (d->cfg->chunk_delay_ms > 0)
            d->next_send = port_monotonic() + d->cfg->chunk_delay_ms / 1000.0;
    }
    if (upload_done(&d->up))
        finish_upload(d);
}

/* ---- events -------------------------------------------------------------------------- */

void device_on_connect(device *d)
{
    d->connected = true;
    /* after every CONNACK: retained online status, then the subscriptions (section 1.2) */
    announce(d);
    d->tp.subscribe(d->tp.ctx, d->t_task, 1);
    if (d->state == DOWNLOADING)
        d->tp.subscribe(d->tp.ctx, d->dl_filter, 1);
    if (d->state == UPLOADING) {
        /* resume: chunks without a PUBACK go again under the same xfer (section 6.2 rule 6);
         * the receiver ignores the duplicates this may create */
        uint64_t again = upload_requeue(&d->up);
        d->stats.resumed_uploads++;
        port_log("INFO", "%s: resuming upload %s: %llu of %llu chunks acknowledged, resending %llu",
                 d->cfg->device, d->up.xfer, (unsigned long long)d->up.acked,
                 (unsigned long long)d->up.n, (unsigned long long)again);
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
    if (d->state == UPLOADING)
        upload_ack(&d->up, mid);
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
