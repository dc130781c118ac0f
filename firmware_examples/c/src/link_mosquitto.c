/* The Linux main loop: libmosquitto under the transport-agnostic device (device.h).
 *
 * One thread: mosquitto_loop() moves bytes for 50 ms at a time, then device_poll() takes a
 * step. Reconnects are ours, not the library's, so the backoff is the protocol's (0.5 s
 * doubling to 30 s, section 1.2) and the device hears of every drop and every CONNACK.
 */
#include <mosquitto.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "device.h"
#include "port.h"

typedef struct {
    struct mosquitto *m;
    device *dev;
    const device_config *cfg;
    bool up;          /* CONNACK accepted, socket open */
    bool socket_open; /* connecting or connected */
    bool ever;        /* connected once: mosquitto_reconnect keeps the session settings */
    int goodbye_mid;
    bool goodbye_acked;
} link_state;

static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

static int tp_publish(void *ctx, const char *topic, const uint8_t *buf, size_t len, int qos,
                      bool retain, int *mid)
{
    link_state *l = ctx;
    return mosquitto_publish(l->m, mid, topic, (int)len, buf, qos, retain) == MOSQ_ERR_SUCCESS ? 0 : -1;
}

static int tp_subscribe(void *ctx, const char *filter, int qos)
{
    link_state *l = ctx;
    return mosquitto_subscribe(l->m, NULL, filter, qos) == MOSQ_ERR_SUCCESS ? 0 : -1;
}

static int tp_unsubscribe(void *ctx, const char *filter)
{
    link_state *l = ctx;
    return mosquitto_unsubscribe(l->m, NULL, filter) == MOSQ_ERR_SUCCESS ? 0 : -1;
}

static void on_connect(struct mosquitto *m, void *obj, int rc)
{
    link_state *l = obj;
    (void)m;
    if (rc != 0) {
        /* 4/5: bad or expired token. Retrying will not help until provisioning issues a new one,
         * but the backoff keeps trying at most every 30 s */
        port_log("ERROR", "%s: broker refused the connection: %s", l->cfg->device,
                 mosquitto_connack_string(rc));
        return;
    }
    l->up = true;
    port_log("INFO", "%s: connected to %s:%d", l->cfg->device, l->cfg->host, l->cfg->port);
    device_on_connect(l->dev);
}

static void on_disconnect(struct mosquitto *m, void *obj, int rc)
{
    link_state *l = obj;
    (void)m;
    (void)rc;
    if (l->up)
        device_on_disconnect(l->dev);
    l->up = false;
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg)
{
    link_state *l = obj;
    (void)m;
    device_on_message(l->dev, msg->topic, msg->payload, (size_t)msg->payloadlen);
}

/* Under 3.1.1 a denied SUBSCRIBE is the only ACL refusal a device can see (SUBACK 0x80). */
static void on_subscribe(struct mosquitto *m, void *obj, int mid, int count, const int *granted)
{
    link_state *l = obj;
    int i;
    (void)m;
    (void)mid;
    for (i = 0; i < count; i++)
        if (granted[i] == 0x80)
            port_log("ERROR", "%s: the broker refused a subscription: check the device's region "
                     "and credentials (protocol 1.3)", l->cfg->device);
}

static void on_publish(struct mosquitto *m, void *obj, int mid)
{
    link_state *l = obj;
    (void)m;
    if (mid == l->goodbye_mid)
        l->goodbye_acked = true;
    device_on_puback(l->dev, mid);
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

int link_run(const device_config *cfg, const dataset *data)
{
    link_state l;
    edgefl_transport tp = {&l, tp_publish, tp_subscribe, tp_unsubscribe};
    char client_id[160];
    const uint8_t *will;
    size_t will_len;
    double backoff = cfg->min_backoff_s, next_try = 0, end;
    device_stats st;
    int rc;

    memset(&l, 0, sizeof l);
    l.cfg = cfg;
    l.goodbye_mid = -1;
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);
    mosquitto_lib_init();
    /* a stable client id and clean_session=false: tasks wait in the broker session (1.2) */
    snprintf(client_id, sizeof client_id, "edgefl-%s-%s", cfg->project, cfg->device);
    l.m = mosquitto_new(client_id, false, &l);
    l.dev = device_new(cfg, data, &tp);
    if (l.m == NULL || l.dev == NULL) {
        port_log("ERROR", "out of memory");
        return 1;
    }
    mosquitto_int_option(l.m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_int_option(l.m, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_username_pw_set(l.m, cfg->username, cfg->password[0] ? cfg->password : NULL);
    if (cfg->tls) {
        /* the broker's certificate and host name are verified (insecure mode is not offered) */
        rc = mosquitto_tls_set(l.m, cfg->ca_file[0] ? cfg->ca_file : NULL,
                               cfg->ca_file[0] ? NULL : "/etc/ssl/certs",
                               cfg->cert_file[0] ? cfg->cert_file : NULL,
                               cfg->key_file[0] ? cfg->key_file : NULL, NULL);
        if (rc != MOSQ_ERR_SUCCESS) {
            port_log("ERROR", "%s: TLS set-up failed: %s", cfg->device, mosquitto_strerror(rc));
            return 2;
        }
    }
    will = device_will(l.dev, &will_len);
    mosquitto_will_set(l.m, device_status_topic(l.dev), (int)will_len, will, 1, true);
    mosquitto_connect_callback_set(l.m, on_connect);
    mosquitto_disconnect_callback_set(l.m, on_disconnect);
    mosquitto_message_callback_set(l.m, on_message);
    mosquitto_publish_callback_set(l.m, on_publish);
    mosquitto_subscribe_callback_set(l.m, on_subscribe);

    while (!stopping) {
        double now = port_monotonic();
        if (!l.socket_open && now >= next_try) {
            rc = l.ever ? mosquitto_reconnect(l.m)
                        : mosquitto_connect(l.m, cfg->host, cfg->port, cfg->keepalive);
            if (rc == MOSQ_ERR_SUCCESS) {
                l.socket_open = l.ever = true;
            } else {
                port_log("WARN", "%s: cannot reach %s:%d (%s); retrying in %.1f s", cfg->device,
                         cfg->host, cfg->port, mosquitto_strerror(rc), backoff);
                next_try = now + backoff;
                backoff = backoff * 2 < cfg->max_backoff_s ? backoff * 2 : cfg->max_backoff_s;
            }
        }
        if (l.socket_open) {
            bool was_up = l.up;
            rc = mosquitto_loop(l.m, 50, 1);
            if (l.up && !was_up)
                backoff = cfg->min_backoff_s; /* a CONNACK: start the backoff afresh */
            if (rc != MOSQ_ERR_SUCCESS) {
                if (l.up)
                    device_on_disconnect(l.dev);
                l.up = l.socket_open = false;
                port_log("WARN", "%s: connection lost (%s); reconnecting in %.1f s", cfg->device,
                         mosquitto_strerror(rc), backoff);
                next_try = port_monotonic() + backoff;
                backoff = backoff * 2 < cfg->max_backoff_s ? backoff * 2 : cfg->max_backoff_s;
            }
        } else {
            sleep_s(0.05);
        }
        device_poll(l.dev);
    }

    /* a clean shutdown: say offline (retained), then DISCONNECT, which suppresses the will */
    if (l.up && device_goodbye(l.dev, &l.goodbye_mid) == 0) {
        end = port_monotonic() + 2.0;
        while (!l.goodbye_acked && port_monotonic() < end &&
               mosquitto_loop(l.m, 50, 1) == MOSQ_ERR_SUCCESS)
            ;
    }
    if (l.socket_open) {
        mosquitto_disconnect(l.m);
        mosquitto_loop(l.m, 50, 1);
    }
    st = device_get_stats(l.dev);
    printf("{\"device\": \"%s\", \"completed\": %u, \"declined\": %u, \"failed\": %u, "
           "\"resumed_uploads\": %u}\n",
           cfg->device, st.completed, st.declined, st.failed, st.resumed_uploads);
    fflush(stdout);
    device_free(l.dev);
    mosquitto_destroy(l.m);
    mosquitto_lib_cleanup();
    return 0;
}
