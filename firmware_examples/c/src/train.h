/* The canonical softmax-regression training of the digits task, in C (docs/digits.md step 6).
 *
 * Minibatch SGD on float64, one generator per (seed, round) as numpy's
 * default_rng([seed, round]), a fresh permutation per epoch, batches as consecutive slices.
 * Every sum runs in the same order on every call, so the step is a deterministic function of
 * model, data, settings, seed and round (protocol section 8, step 5).
 */
#ifndef EDGEFL_TRAIN_H
#define EDGEFL_TRAIN_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t n, d;  /* examples, features */
    double *X;      /* n x d, row-major */
    int32_t *y;     /* n labels */
} dataset;

typedef struct {
    uint32_t d, k;  /* features, classes */
    double *W;      /* d x k, row-major: tensor "W" */
    double *b;      /* k: tensor "b" */
} softmax_model;

typedef struct {
    double lr;
    uint32_t batch_size, epochs;
    double mu; /* FedProx's proximal coefficient (protocol 4.1a); 0: plain SGD */
} train_settings;

/* Load the device's local data file (format in README.md). Returns 0, or -1 with why in err. */
int dataset_load(const char *path, dataset *ds, char *err, size_t errlen);
void dataset_free(dataset *ds);

int model_alloc(softmax_model *m, uint32_t d, uint32_t k);
void model_free(softmax_model *m);

/* Train m in place. Returns 0, or -1 (out of memory, a label out of range). */
int train_softmax(softmax_model *m, const dataset *ds, uint32_t seed, uint32_t round,
                  const train_settings *s);
/* Loss (mean cross-entropy, p clipped at 1e-12) and accuracy of m on ds, as numpy's evaluate. */
void evaluate_softmax(const softmax_model *m, const dataset *ds, double *loss, double *accuracy);

#endif
