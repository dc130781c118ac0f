/* What the device logic needs from its platform: clocks, randomness and a log.
 * port_posix.c implements it for Linux; the ESP32 example has its own. */
#ifndef EDGEFL_PORT_H
#define EDGEFL_PORT_H

#include <stddef.h>
#include <stdint.h>

double port_time(void);      /* wall clock, Unix seconds (task deadlines are wall-clock) */
double port_monotonic(void); /* seconds, for durations and timeouts */
void port_random(uint8_t *buf, size_t n);
void port_log(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
