/* port.h for ESP-IDF: SNTP wall clock, esp_timer, the hardware RNG, the console. */
#include <stdarg.h>
#include <stdio.h>
#include <sys/time.h>

#include "esp_random.h"
#include "esp_timer.h"
#include "port.h"

double port_time(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL); /* set by SNTP at boot (main.c) */
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

double port_monotonic(void) { return esp_timer_get_time() / 1e6; }

void port_random(uint8_t *buf, size_t n) { esp_fill_random(buf, n); }

void port_log(const char *level, const char *fmt, ...)
{
    va_list ap;
    printf("%.3f %s ", port_monotonic(), level);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}
