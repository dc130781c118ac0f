#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "port.h"

double port_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

double port_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

void port_random(uint8_t *buf, size_t n)
{
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(buf, 1, n, f) : 0, i;
    if (f)
        fclose(f);
    for (i = got; i < n; i++) /* no urandom: still unique enough for a transfer id */
        buf[i] = (uint8_t)(rand() ^ (int)(port_monotonic() * 1e6));
}

void port_log(const char *level, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%.3f %s ", port_time(), level);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
}
