/* edgefl-device: a protocol v1 device in C (libmosquitto + libcbor). See ../README.md. */
#include <stdio.h>

#include "config.h"
#include "port.h"
#include "train.h"

int link_run(const device_config *cfg, const dataset *data);

int main(int argc, char **argv)
{
    static device_config cfg; /* static: the token buffer is large */
    dataset data;
    char err[512];
    int rc = config_parse(argc, argv, &cfg, err, sizeof err);
    if (rc != 0) {
        if (rc < 0)
            fprintf(stderr, "edgefl-device: %s\n", err);
        return rc < 0 ? 2 : 0;
    }
    if (dataset_load(cfg.data_path, &data, err, sizeof err) != 0) {
        fprintf(stderr, "edgefl-device: %s\n", err);
        return 2;
    }
    port_log("INFO", "%s: %u local examples of %u features, seed %u, broker %s:%d", cfg.device,
             data.n, data.d, cfg.seed, cfg.host, cfg.port);
    rc = link_run(&cfg, &data);
    dataset_free(&data);
    return rc;
}
