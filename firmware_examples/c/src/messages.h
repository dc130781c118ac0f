/* Control messages of protocol v1 (section 4) that a device sends or takes. */
#ifndef EDGEFL_MESSAGES_H
#define EDGEFL_MESSAGES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbor_io.h"
#include "tensors.h"
#include "train.h"

#define ID_MAX 65        /* topic segments: 1-64 chars of [A-Za-z0-9_.-] */
#define TASK_ID_MAX 200

typedef struct {
    char task_id[TASK_ID_MAX];
    char session[TASK_ID_MAX];
    uint64_t round;
    uint64_t attempt;        /* the last part of task_id */
    uint64_t fence;          /* 0 when absent */
    char model_version[ID_MAX];
    uint8_t model_digest[32];
    double deadline;
    uint64_t chunk_size;
    train_settings train;
    char compression[32];    /* compression.encoding, "" when the task has none (5a) */
    bool has_package;
} task_msg;

/* Decode and check a task (required fields and types, section 4.1). 0, or -1 with why. */
int msg_task_decode(const uint8_t *buf, size_t len, task_msg *t, char *err, size_t errlen);

/* status: region may be NULL (the last will leaves it out) */
void msg_status(cbor_out *o, const char *state, double ts, const char *device, const char *region,
                const char *agent);
void msg_update(cbor_out *o, const task_msg *t, const char *device, uint32_t num_examples,
                double train_loss, double train_accuracy, const softmax_model *m);
void msg_decline(cbor_out *o, const char *task_id, const char *reason);
void msg_fetch(cbor_out *o, const char *version);
void msg_telemetry(cbor_out *o, double ts, const char *const *names, const double *values, size_t n);

/* [A-Za-z0-9_.-]{1,64}: what a topic segment may be (section 2) */
bool segment_ok(const char *s);

#endif
