#include "np_random.h"

/* numpy/random/bit_generator.pyx (SeedSequence) constants */
#define INIT_A 0x43b0d7e5u
#define MULT_A 0x931e8875u
#define INIT_B 0x8b51f9ddu
#define MULT_B 0x58f38dedu
#define MIX_MULT_L 0xca01f9ddu
#define MIX_MULT_R 0x4973f715u
#define XSHIFT 16
#define POOL 4

/* PCG_DEFAULT_MULTIPLIER_128 */
static const u128 MULT = {0x2360ED051FC65DA4ull, 0x4385DF649FCCF645ull};

static uint32_t hashmix(uint32_t value, uint32_t *hc)
{
    value ^= *hc;
    *hc *= MULT_A;
    value *= *hc;
    value ^= value >> XSHIFT;
    return value;
}

static uint32_t mix(uint32_t x, uint32_t y)
{
    uint32_t r = MIX_MULT_L * x - MIX_MULT_R * y;
    r ^= r >> XSHIFT;
    return r;
}

static void mul64(uint64_t a, uint64_t b, uint64_t *hi, uint64_t *lo)
{
    uint64_t a0 = a & 0xffffffffu, a1 = a >> 32, b0 = b & 0xffffffffu, b1 = b >> 32;
    uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    uint64_t mid = (p00 >> 32) + (p01 & 0xffffffffu) + (p10 & 0xffffffffu);
    *lo = (mid << 32) | (p00 & 0xffffffffu);
    *hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
}

static u128 add128(u128 a, u128 b)
{
    u128 r;
    r.lo = a.lo + b.lo;
    r.hi = a.hi + b.hi + (r.lo < a.lo);
    return r;
}

static u128 mul128(u128 a, u128 b) /* mod 2**128 */
{
    u128 r;
    mul64(a.lo, b.lo, &r.hi, &r.lo);
    r.hi += a.lo * b.hi + a.hi * b.lo;
    return r;
}

static void step(np_pcg64 *g)
{
    g->state = add128(mul128(g->state, MULT), g->inc);
}

void np_pcg64_seed(np_pcg64 *g, const uint32_t *entropy, size_t n_entropy)
{
    uint32_t pool[POOL], hc = INIT_A, words[8];
    uint64_t v[4];
    size_t i, j;
    for (i = 0; i < POOL; i++)
        pool[i] = hashmix(i < n_entropy ? entropy[i] : 0, &hc);
    for (i = 0; i < POOL; i++)
        for (j = 0; j < POOL; j++)
            if (i != j)
                pool[j] = mix(pool[j], hashmix(pool[i], &hc));
    for (i = POOL; i < n_entropy; i++)
        for (j = 0; j < POOL; j++)
            pool[j] = mix(pool[j], hashmix(entropy[i], &hc));
    /* generate_state(4, uint64): 8 words, little-endian pairs */
    hc = INIT_B;
    for (i = 0; i < 8; i++) {
        uint32_t d = pool[i % POOL];
        d ^= hc;
        hc *= MULT_B;
        d *= hc;
        d ^= d >> XSHIFT;
        words[i] = d;
    }
    for (i = 0; i < 4; i++)
        v[i] = (uint64_t)words[2 * i] | (uint64_t)words[2 * i + 1] << 32;
    /* pcg64_set_seed: initstate = (v0, v1), initseq = (v2, v3); pcg_setseq_128_srandom_r */
    g->state.hi = g->state.lo = 0;
    g->inc.hi = (v[2] << 1) | (v[3] >> 63);
    g->inc.lo = (v[3] << 1) | 1u;
    step(g);
    g->state = add128(g->state, (u128){v[0], v[1]});
    step(g);
    g->has_uint32 = 0;
    g->uinteger = 0;
}

uint64_t np_pcg64_next64(np_pcg64 *g)
{
    uint64_t x;
    unsigned rot;
    step(g);
    x = g->state.hi ^ g->state.lo;
    rot = (unsigned)(g->state.hi >> 58);
    return (x >> rot) | (x << ((64 - rot) & 63));
}

uint32_t np_pcg64_next32(np_pcg64 *g)
{
    uint64_t next;
    if (g->has_uint32) {
        g->has_uint32 = 0;
        return g->uinteger;
    }
    next = np_pcg64_next64(g);
    g->has_uint32 = 1;
    g->uinteger = (uint32_t)(next >> 32);
    return (uint32_t)next;
}

uint64_t np_random_interval(np_pcg64 *g, uint64_t max)
{
    uint64_t mask = max, value;
    if (max == 0)
        return 0;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    if (max <= 0xffffffffu) {
        while ((value = (np_pcg64_next32(g) & mask)) > max)
            ;
    } else {
        while ((value = (np_pcg64_next64(g) & mask)) > max)
            ;
    }
    return value;
}

void np_permutation(np_pcg64 *g, uint32_t *out, uint32_t n)
{
    uint32_t i;
    for (i = 0; i < n; i++)
        out[i] = i;
    for (i = n; i-- > 1;) {
        uint32_t j = (uint32_t)np_random_interval(g, i), t = out[i];
        out[i] = out[j];
        out[j] = t;
    }
}
