/* numpy's default_rng([seed, round]).permutation(n), bit for bit, in portable C.
 *
 * The canonical digits task shuffles each device's data with numpy's Generator: SeedSequence
 * (entropy pool of 4 words, hashmix) -> PCG64 (XSL-RR 128/64) -> Fisher-Yates with numpy's
 * masked rejection sampler (random_interval). Implementing all three makes a C device's
 * update equal the Python reference's, so a mixed fleet reproduces the reference run.
 * 128-bit arithmetic is done on two uint64 halves: 32-bit MCUs have no __int128.
 */
#ifndef EDGEFL_NP_RANDOM_H
#define EDGEFL_NP_RANDOM_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint64_t hi, lo;
} u128;

typedef struct {
    u128 state, inc;
    int has_uint32;    /* numpy hands out the high half of a 64-bit draw on the next 32-bit call */
    uint32_t uinteger;
} np_pcg64;

/* Seed like numpy.random.default_rng(entropy) for a list of non-negative ints < 2**32. */
void np_pcg64_seed(np_pcg64 *g, const uint32_t *entropy, size_t n_entropy);
uint64_t np_pcg64_next64(np_pcg64 *g);
uint32_t np_pcg64_next32(np_pcg64 *g);
/* numpy's random_interval: uniform in [0, max] by masked rejection. */
uint64_t np_random_interval(np_pcg64 *g, uint64_t max);
/* out = Generator.permutation(n) */
void np_permutation(np_pcg64 *g, uint32_t *out, uint32_t n);

#endif
