/* The device: protocol v1's device side as a transport-agnostic state machine.
 *
 * It owns no socket and no thread. The platform feeds it events (connected, disconnected,
 * a message, a PUBACK) and calls device_poll often (every 50 ms or so); the device answers
 * through the transport's publish/subscribe. So the same file runs on libmosquitto
 * (link_mosquitto.c) and on ESP-IDF's esp-mqtt (firmware_examples/esp32). Not thread-safe:
 * call it from one thread, or under one lock.
 */
#ifndef EDGEFL_DEVICE_H
#define EDGEFL_DEVICE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "train.h"

#define AGENT_VERSION "edgefl-c/0.1.0"

typedef struct {
    void *ctx;
    /* 0 on success; *mid identifies the publish for its PUBACK (QoS 1) */
    int (*publish)(void *ctx, const char *topic, const uint8_t *buf, size_t len, int qos,
                   bool retain, int *mid);
    int (*subscribe)(void *ctx, const char *filter, int qos);
    int (*unsubscribe)(void *ctx, const char *filter);
} edgefl_transport;

typedef struct {
    uint32_t completed, declined, failed, resumed_uploads;
} device_stats;

typedef struct device device;

device *device_new(const device_config *cfg, const dataset *data, const edgefl_transport *tp);
void device_free(device *d);
const char *device_status_topic(const device *d);
/* the "offline" status for the last will (section 7); valid until device_free */
const uint8_t *device_will(const device *d, size_t *len);
void device_on_connect(device *d);
void device_on_disconnect(device *d);
void device_on_message(device *d, const char *topic, const uint8_t *payload, size_t len);
void device_on_puback(device *d, int mid);
void device_poll(device *d);
/* publish the offline status before a clean DISCONNECT; *mid for its PUBACK */
int device_goodbye(device *d, int *mid);
device_stats device_get_stats(const device *d);
bool device_busy(const device *d);

#endif
