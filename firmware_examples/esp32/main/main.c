/* edgefl device on ESP32: Wi-Fi, SNTP, SPIFFS data, esp-mqtt under the C example's device.
 *
 * Same structure as firmware_examples/c/src/link_mosquitto.c: one task owns the device
 * state machine (device.h) and calls device_poll every 50 ms. esp-mqtt runs in its own task;
 * its event handler never touches the device: it copies each event into a queue that the
 * device task drains, so the device stays single-threaded and no lock order can deadlock.
 * Reconnects are ours (auto-reconnect off) so the backoff is the protocol's: 0.5 s doubling
 * to 30 s.
 */
#include <stdlib.h>
#include <string.h>

#include "esp_event.h"
#include "esp_log.h"
#include "esp_netif.h"
#include "esp_netif_sntp.h"
#include "esp_spiffs.h"
#include "esp_wifi.h"
#include "freertos/FreeRTOS.h"
#include "freertos/event_groups.h"
#include "freertos/queue.h"
#include "freertos/task.h"
#include "mqtt_client.h"
#include "nvs_flash.h"

#include "config.h"
#include "device.h"
#include "port.h"
#include "train.h"

#define DATA_PATH "/data/local.efld"
#define RX_MAX (CONFIG_EDGEFL_MAX_CHUNK > 16384 ? CONFIG_EDGEFL_MAX_CHUNK + 8192 : 16384 + 8192)

typedef enum { EV_CONNECTED, EV_DISCONNECTED, EV_DATA, EV_PUBACK } ev_kind;
typedef struct {
    ev_kind kind;
    int mid;
    char *topic;      /* EV_DATA: heap copies, freed by the device task */
    uint8_t *payload;
    size_t len;
} link_event;

static QueueHandle_t events;
static esp_mqtt_client_handle_t client;
static EventGroupHandle_t wifi_group;

/* esp-mqtt hands a large message over in fragments: put them back together */
static struct {
    char topic[256];
    uint8_t *buf;
    size_t total;
} rx;

static int tp_publish(void *ctx, const char *topic, const uint8_t *buf, size_t len, int qos,
                      bool retain, int *mid)
{
    (void)ctx;
    *mid = esp_mqtt_client_publish(client, topic, (const char *)buf, (int)len, qos, retain);
    return *mid < 0 ? -1 : 0;
}

static int tp_subscribe(void *ctx, const char *filter, int qos)
{
    (void)ctx;
    return esp_mqtt_client_subscribe(client, filter, qos) < 0 ? -1 : 0;
}

static int tp_unsubscribe(void *ctx, const char *filter)
{
    (void)ctx;
    return esp_mqtt_client_unsubscribe(client, filter) < 0 ? -1 : 0;
}

static void on_mqtt(void *arg, esp_event_base_t base, int32_t id, void *data)
{
    esp_mqtt_event_handle_t e = data;
    link_event ev = {0};
    (void)arg;
    (void)base;
    switch ((esp_mqtt_event_id_t)id) {
    case MQTT_EVENT_CONNECTED:
        ev.kind = EV_CONNECTED;
        break;
    case MQTT_EVENT_DISCONNECTED:
        ev.kind = EV_DISCONNECTED;
        break;
    case MQTT_EVENT_PUBLISHED:
        ev.kind = EV_PUBACK;
        ev.mid = e->msg_id;
        break;
    case MQTT_EVENT_DATA:
        if (e->current_data_offset == 0) {
            free(rx.buf);
            rx.buf = NULL;
            if (e->total_data_len > RX_MAX || e->topic_len >= (int)sizeof rx.topic)
                return; /* larger than any message this device takes */
            memcpy(rx.topic, e->topic, e->topic_len);
            rx.topic[e->topic_len] = '\0';
            rx.total = e->total_data_len;
            rx.buf = malloc(rx.total + 1);
        }
        if (rx.buf == NULL)
            return;
        memcpy(rx.buf + e->current_data_offset, e->data, e->data_len);
        if ((size_t)(e->current_data_offset + e->data_len) < rx.total)
            return;
        ev.kind = EV_DATA;
        ev.topic = strdup(rx.topic);
        ev.payload = rx.buf;
        ev.len = rx.total;
        rx.buf = NULL;
        break;
    case MQTT_EVENT_ERROR: /* a denied SUBSCRIBE (SUBACK 0x80): check region and token */
        if (e->error_handle != NULL &&
            e->error_handle->error_type == MQTT_ERROR_TYPE_SUBSCRIBE_FAILED)
            port_log("ERROR", "the broker refused a subscription (protocol 1.3)");
        return;
    default:
        return;
    }
    if (xQueueSend(events, &ev, pdMS_TO_TICKS(1000)) != pdTRUE && ev.kind == EV_DATA) {
        free(ev.topic);
        free(ev.payload);
    }
}

static void on_wifi(void *arg, esp_event_base_t base, int32_t id, void *data)
{
    (void)arg;
    (void)data;
    if (base == WIFI_EVENT && (id == WIFI_EVENT_STA_START || id == WIFI_EVENT_STA_DISCONNECTED))
        esp_wifi_connect();
    else if (base == IP_EVENT && id == IP_EVENT_STA_GOT_IP)
        xEventGroupSetBits(wifi_group, 1);
}

static void start_wifi(void)
{
    wifi_init_config_t init = WIFI_INIT_CONFIG_DEFAULT();
    wifi_config_t sta = {0};
    wifi_group = xEventGroupCreate();
    ESP_ERROR_CHECK(esp_netif_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    esp_netif_create_default_wifi_sta();
    ESP_ERROR_CHECK(esp_wifi_init(&init));
    ESP_ERROR_CHECK(esp_event_handler_register(WIFI_EVENT, ESP_EVENT_ANY_ID, on_wifi, NULL));
    ESP_ERROR_CHECK(esp_event_handler_register(IP_EVENT, IP_EVENT_STA_GOT_IP, on_wifi, NULL));
    strncpy((char *)sta.sta.ssid, CONFIG_EDGEFL_WIFI_SSID, sizeof sta.sta.ssid - 1);
    strncpy((char *)sta.sta.password, CONFIG_EDGEFL_WIFI_PASSWORD, sizeof sta.sta.password - 1);
    ESP_ERROR_CHECK(esp_wifi_set_mode(WIFI_MODE_STA));
    ESP_ERROR_CHECK(esp_wifi_set_config(WIFI_IF_STA, &sta));
    ESP_ERROR_CHECK(esp_wifi_start());
    xEventGroupWaitBits(wifi_group, 1, pdFALSE, pdTRUE, portMAX_DELAY);
}

void app_main(void)
{
    static device_config cfg;
    static dataset data;
    static char client_id[160];
    edgefl_transport tp = {NULL, tp_publish, tp_subscribe, tp_unsubscribe};
    esp_vfs_spiffs_conf_t fs = {.base_path = "/data", .partition_label = NULL, .max_files = 2};
    esp_sntp_config_t sntp = ESP_NETIF_SNTP_DEFAULT_CONFIG(CONFIG_EDGEFL_SNTP_SERVER);
    char err[256];
    const uint8_t *will;
    size_t will_len;
    double backoff = 0.5, next_try = 0;
    bool up = false, dialing = false;
    device *dev;

    ESP_ERROR_CHECK(nvs_flash_init());
    ESP_ERROR_CHECK(esp_vfs_spiffs_register(&fs));
    start_wifi();
    esp_netif_sntp_init(&sntp);
    esp_netif_sntp_sync_wait(pdMS_TO_TICKS(15000)); /* task deadlines are wall-clock */

    /* the same settings as the Linux flags, from menuconfig */
    strcpy(cfg.project, CONFIG_EDGEFL_PROJECT);
    strcpy(cfg.region, CONFIG_EDGEFL_REGION);
    strcpy(cfg.device, CONFIG_EDGEFL_DEVICE_ID);
    strcpy(cfg.username, CONFIG_EDGEFL_DEVICE_ID);
    snprintf(cfg.password, sizeof cfg.password, "%s", CONFIG_EDGEFL_TOKEN);
    strcpy(cfg.data_path, DATA_PATH);
    cfg.seed = CONFIG_EDGEFL_SEED >= 0 ? (uint32_t)CONFIG_EDGEFL_SEED
                                       : crc32_str(cfg.device) & 0x7fffffffu;
    cfg.max_chunk = CONFIG_EDGEFL_MAX_CHUNK;
    cfg.max_model = 256 * 1024;
    cfg.keepalive = 30;
    cfg.window = 4;
    cfg.min_backoff_s = 0.5;
    cfg.max_backoff_s = 30;
    cfg.download_timeout_s = 60;
    cfg.fetch_after_s = 3;
    if (!segment_ok(cfg.project) || !segment_ok(cfg.region) || !segment_ok(cfg.device) ||
        dataset_load(cfg.data_path, &data, err, sizeof err) != 0) {
        port_log("ERROR", "bad configuration or data: %s", err);
        return;
    }

    events = xQueueCreate(32, sizeof(link_event));
    dev = device_new(&cfg, &data, &tp);
    will = device_will(dev, &will_len);
    snprintf(client_id, sizeof client_id, "edgefl-%s-%s", cfg.project, cfg.device);
    esp_mqtt_client_config_t mc = {
        .broker.address.uri = CONFIG_EDGEFL_BROKER_URI,
        .credentials = {.username = cfg.username, .client_id = client_id,
                        .authentication.password = cfg.password},
        .session = {.keepalive = cfg.keepalive,
                    .disable_clean_session = true, /* a persistent session (protocol 1.2) */
                    .protocol_ver = MQTT_PROTOCOL_V_3_1_1,
                    .last_will = {.topic = device_status_topic(dev), .msg = (const char *)will,
                                  .msg_len = (int)will_len, .qos = 1, .retain = 1}},
        .network = {.disable_auto_reconnect = true},
        .buffer = {.size = 16384, .out_size = CONFIG_EDGEFL_MAX_CHUNK + 1024},
    };
    client = esp_mqtt_client_init(&mc);
    esp_mqtt_client_register_event(client, ESP_EVENT_ANY_ID, on_mqtt, NULL);

    for (;;) {
        link_event ev;
        while (xQueueReceive(events, &ev, 0) == pdTRUE) {
            switch (ev.kind) {
            case EV_CONNECTED:
                up = true;
                dialing = false;
                backoff = 0.5;
                device_on_connect(dev);
                break;
            case EV_DISCONNECTED:
                if (up)
                    device_on_disconnect(dev);
                up = dialing = false;
                next_try = port_monotonic() + backoff;
                backoff = backoff * 2 < 30 ? backoff * 2 : 30;
                break;
            case EV_DATA:
                device_on_message(dev, ev.topic, ev.payload, ev.len);
                free(ev.topic);
                free(ev.payload);
                break;
            case EV_PUBACK:
                device_on_puback(dev, ev.mid);
                break;
            }
        }
        if (!up && !dialing && port_monotonic() >= next_try) {
            static bool started;
            dialing = true;
            if (!started) {
                started = true;
                esp_mqtt_client_start(client);
            } else {
                esp_mqtt_client_reconnect(client);
            }
        }
        device_poll(dev);
        vTaskDelay(pdMS_TO_TICKS(50));
    }
}
