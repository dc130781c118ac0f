/* Device configuration: command-line flags, each with an EDGEFL_* environment fallback. */
#ifndef EDGEFL_CONFIG_H
#define EDGEFL_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "chunks.h"
#include "messages.h"

typedef struct {
    char host[256];
    int port;
    char username[256];     /* default: the device id (section 1.3) */
    char password[4096];    /* the device's JWT from provisioning, or its broker password */
    char project[ID_MAX], region[ID_MAX], device[ID_MAX];
    char data_path[1024];
    /* TLS (protocol 1.2): on with --tls or a CA file; the broker's certificate is verified */
    int tls;
    char ca_file[1024], cert_file[1024], key_file[1024];
    uint32_t seed;          /* seed index; default crc32(device) & 0x7fffffff (section 8 step 5) */
    size_t max_chunk;       /* own maximum chunk size; default 1 MiB */
    size_t max_model;       /* largest model accepted; default 16 MiB */
    int keepalive;          /* seconds, default 30 */
    double min_backoff_s, max_backoff_s;   /* reconnect backoff: 0.5 doubling to 30 */
    double download_timeout_s, fetch_after_s;
    int window;             /* chunks unacknowledged at once during an upload, default 8 */
    int chunk_delay_ms;     /* pause between upload chunks; 0 (a test knob for slow links) */
    int verbose;
} device_config;

/* Fill c from argv and the environment. 0; 1 for --help (usage printed); -1 with why in err. */
int config_parse(int argc, char **argv, device_config *c, char *err, size_t errlen);
uint32_t crc32_str(const char *s);

#endif
