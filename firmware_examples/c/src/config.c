#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char USAGE[] =
    "usage: edgefl-device [options]   (each option also reads the EDGEFL_* variable shown)\n"
    "  --host H            broker host                 EDGEFL_BROKER_HOST (127.0.0.1)\n"
    "  --port P            broker port                 EDGEFL_BROKER_PORT (1883)\n"
    "  --username U        broker user                 EDGEFL_USERNAME (the device id)\n"
    "  --password T        device token / password     EDGEFL_PASSWORD\n"
    "  --password-file F   read the token from F       EDGEFL_PASSWORD_FILE\n"
    "  --project P         project                     EDGEFL_PROJECT (default)\n"
    "  --region R          region                      EDGEFL_REGION (required)\n"
    "  --device D          device id                   EDGEFL_DEVICE_ID (required)\n"
    "  --data F            local data file (EFLD)      EDGEFL_DATA (required)\n"
    "  --seed N            seed index                  EDGEFL_SEED (crc32(device) & 0x7fffffff)\n"
    "  --max-chunk B       own maximum chunk size      EDGEFL_MAX_CHUNK (1048576)\n"
    "  --max-model B       largest model accepted      EDGEFL_MAX_MODEL (16777216)\n"
    "  --keepalive S       MQTT keepalive              EDGEFL_KEEPALIVE (30)\n"
    "  --window N          unacknowledged chunks       EDGEFL_WINDOW (8)\n"
    "  --chunk-delay-ms M  pause between chunks        EDGEFL_CHUNK_DELAY_MS (0)\n"
    "  --tls               TLS, verified against the system CA store\n"
    "  --ca-file F         TLS, verified against CA file F (the fleet CA)  EDGEFL_CA_FILE\n"
    "  --cert-file F       client certificate for mutual TLS   EDGEFL_CERT_FILE\n"
    "  --key-file F        its private key                     EDGEFL_KEY_FILE\n"
    "  -v                  log every step\n";

uint32_t crc32_str(const char *s)
{
    uint32_t crc = 0xffffffffu;
    int k;
    for (; *s; s++) {
        crc ^= (uint8_t)*s;
        for (k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static int copy(char *dst, size_t cap, const char *src, const char *what, char *err, size_t errlen)
{
    if (strlen(src) >= cap) {
        snprintf(err, errlen, "%s is too long (at most %zu characters)", what, cap - 1);
        return -1;
    }
    strcpy(dst, src);
    return 0;
}

static int number(const char *s, long long lo, long long hi, long long *out, const char *what,
                  char *err, size_t errlen)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        snprintf(err, errlen, "%s must be an integer in %lld..%lld, not '%s'", what, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int read_file(const char *path, char *out, size_t cap, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    size_t n;
    if (f == NULL) {
        snprintf(err, errlen, "cannot read password file %s", path);
        return -1;
    }
    n = fread(out, 1, cap - 1, f);
    fclose(f);
    out[n] = '\0';
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == '\r' || out[n - 1] == ' '))
        out[--n] = '\0';
    return 0;
}

enum { O_HOST, O_PORT, O_USER, O_PASS, O_PASSFILE, O_PROJECT, O_REGION, O_DEVICE, O_DATA, O_SEED,
       O_MAXCHUNK, O_MAXMODEL, O_KEEPALIVE, O_WINDOW, O_DELAY, O_CA, O_CERT, O_KEY, O_COUNT };
static const char *const FLAGS[O_COUNT] = {"--host", "--port", "--username", "--password",
    "--password-file", "--project", "--region", "--device", "--data", "--seed", "--max-chunk",
    "--max-model", "--keepalive", "--window", "--chunk-delay-ms", "--ca-file", "--cert-file",
    "--key-file"};
static const char *const ENVS[O_COUNT] = {"EDGEFL_BROKER_HOST", "EDGEFL_BROKER_PORT",
    "EDGEFL_USERNAME", "EDGEFL_PASSWORD", "EDGEFL_PASSWORD_FILE", "EDGEFL_PROJECT", "EDGEFL_REGION",
    "EDGEFL_DEVICE_ID", "EDGEFL_DATA", "EDGEFL_SEED", "EDGEFL_MAX_CHUNK", "EDGEFL_MAX_MODEL",
    "EDGEFL_KEEPALIVE", "EDGEFL_WINDOW", "EDGEFL_CHUNK_DELAY_MS", "EDGEFL_CA_FILE",
    "EDGEFL_CERT_FILE", "EDGEFL_KEY_FILE"};

int config_parse(int argc, char **argv, device_config *c, char *err, size_t errlen)
{
    const char *val[O_COUNT] = {0};
    long long v;
    int i, k;
    memset(c, 0, sizeof *c);
    for (k = 0; k < O_COUNT; k++)
        val[k] = getenv(ENVS[k]);
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            fputs(USAGE, stdout);
            return 1;
        }
        if (strcmp(argv[i], "-v") == 0 || strcmp(argv[i], "--tls") == 0) {
            if (argv[i][1] == 'v')
                c->verbose = 1;
            else
                c->tls = 1;
            continue;
        }
        for (k = 0; k < O_COUNT && strcmp(argv[i], FLAGS[k]) != 0; k++)
            ;
        if (k == O_COUNT || i + 1 >= argc) {
            snprintf(err, errlen, "%s '%s' (try --help)",
                     k == O_COUNT ? "unknown option" : "missing value for", argv[i]);
            return -1;
        }
        val[k] = argv[++i];
    }
    if (copy(c->host, sizeof c->host, val[O_HOST] ? val[O_HOST] : "127.0.0.1", "host", err, errlen) ||
        copy(c->project, sizeof c->project, val[O_PROJECT] ? val[O_PROJECT] : "default", "project", err, errlen))
        return -1;
    if (!val[O_REGION] || !val[O_DEVICE] || !val[O_DATA]) {
        snprintf(err, errlen, "--region, --device and --data are required (try --help)");
        return -1;
    }
    if (copy(c->region, sizeof c->region, val[O_REGION], "region", err, errlen) ||
        copy(c->device, sizeof c->device, val[O_DEVICE], "device", err, errlen) ||
        copy(c->data_path, sizeof c->data_path, val[O_DATA], "data path", err, errlen) ||
        copy(c->username, sizeof c->username, val[O_USER] ? val[O_USER] : c->device, "username", err, errlen))
        return -1;
    if (!segment_ok(c->project) || !segment_ok(c->region) || !segment_ok(c->device)) {
        snprintf(err, errlen, "project, region and device must be 1-64 characters of [A-Za-z0-9_.-]");
        return -1;
    }
    if (val[O_PASSFILE] && read_file(val[O_PASSFILE], c->password, sizeof c->password, err, errlen))
        return -1;
    if (val[O_PASS] && copy(c->password, sizeof c->password, val[O_PASS], "password", err, errlen))
        return -1;
    if ((val[O_CA] && copy(c->ca_file, sizeof c->ca_file, val[O_CA], "CA file", err, errlen)) ||
        (val[O_CERT] && copy(c->cert_file, sizeof c->cert_file, val[O_CERT], "cert file", err, errlen)) ||
        (val[O_KEY] && copy(c->key_file, sizeof c->key_file, val[O_KEY], "key file", err, errlen)))
        return -1;
    if (!c->cert_file[0] != !c->key_file[0]) {
        snprintf(err, errlen, "--cert-file and --key-file go together (mutual TLS)");
        return -1;
    }
    c->tls = c->tls || c->ca_file[0] || c->cert_file[0];
    c->port = c->tls ? 8883 : 1883;
    c->seed = crc32_str(c->device) & 0x7fffffffu;
    c->max_chunk = 1024 * 1024;
    c->max_model = 16 * 1024 * 1024;
    c->keepalive = 30;
    c->window = 8;
    c->min_backoff_s = 0.5;
    c->max_backoff_s = 30.0;
    c->download_timeout_s = 60.0;
    c->fetch_after_s = 3.0;
    if (val[O_PORT]) {
        if (number(val[O_PORT], 1, 65535, &v, "--port", err, errlen)) return -1;
        c->port = (int)v;
    }
    if (val[O_SEED]) {
        if (number(val[O_SEED], 0, 0xffffffffll, &v, "--seed", err, errlen)) return -1;
        c->seed = (uint32_t)v;
    }
    if (val[O_MAXCHUNK]) {
        if (number(val[O_MAXCHUNK], MIN_CHUNK, MAX_CHUNK, &v, "--max-chunk", err, errlen)) return -1;
        c->max_chunk = (size_t)v;
    }
    if (val[O_MAXMODEL]) {
        if (number(val[O_MAXMODEL], 1, 256ll << 20, &v, "--max-model", err, errlen)) return -1;
        c->max_model = (size_t)v;
    }
    if (val[O_KEEPALIVE]) {
        if (number(val[O_KEEPALIVE], 5, 65535, &v, "--keepalive", err, errlen)) return -1;
        c->keepalive = (int)v;
    }
    if (val[O_WINDOW]) {
        if (number(val[O_WINDOW], 1, 64, &v, "--window", err, errlen)) return -1;
        c->window = (int)v;
    }
    if (val[O_DELAY]) {
        if (number(val[O_DELAY], 0, 60000, &v, "--chunk-delay-ms", err, errlen)) return -1;
        c->chunk_delay_ms = (int)v;
    }
    return 0;
}
