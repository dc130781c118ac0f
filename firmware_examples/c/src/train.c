#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "np_random.h"

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

int dataset_load(const char *path, dataset *ds, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    uint8_t head[16];
    size_t nx;
    uint32_t i;
    memset(ds, 0, sizeof *ds);
    if (f == NULL) {
        snprintf(err, errlen, "cannot open data file %s", path);
        return -1;
    }
    if (fread(head, 1, 16, f) != 16 || memcmp(head, "EFLD", 4) != 0 || le32(head + 4) != 1) {
        snprintf(err, errlen, "%s is not an edgefl data file (magic EFLD, version 1)", path);
        fclose(f);
        return -1;
    }
    ds->n = le32(head + 8);
    ds->d = le32(head + 12);
    if (ds->d == 0 || ds->d > 1u << 20 || ds->n > 1u << 24) {
        snprintf(err, errlen, "%s: implausible size %u x %u", path, ds->n, ds->d);
        fclose(f);
        return -1;
    }
    nx = (size_t)ds->n * ds->d;
    ds->X = malloc(nx * sizeof(double) + 1);
    ds->y = malloc((size_t)ds->n * sizeof(int32_t) + 1);
    /* the file is little-endian; so are x86, ARM and the ESP32 */
    if (ds->X == NULL || ds->y == NULL || fread(ds->X, sizeof(double), nx, f) != nx ||
        fread(ds->y, sizeof(int32_t), ds->n, f) != ds->n) {
        snprintf(err, errlen, "%s: truncated (expected %u examples of %u features)", path, ds->n,
                 ds->d);
        fclose(f);
        dataset_free(ds);
        return -1;
    }
    fclose(f);
    for (i = 0; i < ds->n; i++)
        if (ds->y[i] < 0) {
            snprintf(err, errlen, "%s: negative label at row %u", path, i);
            dataset_free(ds);
            return -1;
        }
    return 0;
}

void dataset_free(dataset *ds)
{
    free(ds->X);
    free(ds->y);
    ds->X = NULL;
    ds->y = NULL;
    ds->n = 0;
}

int model_alloc(softmax_model *m, uint32_t d, uint32_t k)
{
    m->d = d;
    m->k = k;
    m->W = calloc((size_t)d * k + 1, sizeof(double));
    m->b = calloc((size_t)k + 1, sizeof(double));
    if (m->W == NULL || m->b == NULL) {
        model_free(m);
        return -1;
    }
    return 0;
}

void model_free(softmax_model *m)
{
    free(m->W);
    free(m->b);
    m->W = m->b = NULL;
}

/* z = x W + b for one row, then softmax in place (max-subtracted, as numpy's _softmax) */
static void logits_row(const softmax_model *m, const double *x, double *z)
{
    uint32_t j, c;
    for (c = 0; c < m->k; c++)
        z[c] = 0.0;
    for (j = 0; j < m->d; j++)
        for (c = 0; c < m->k; c++)
            z[c] += x[j] * m->W[(size_t)j * m->k + c];
    for (c = 0; c < m->k; c++)
        z[c] += m->b[c];
}

static void softmax_row(double *z, uint32_t k)
{
    double mx = z[0], sum = 0.0;
    uint32_t c;
    for (c = 1; c < k; c++)
        if (z[c] > mx)
            mx = z[c];
    for (c = 0; c < k; c++) {
        z[c] = exp(z[c] - mx);
        sum += z[c];
    }
    for (c = 0; c < k; c++)
        z[c] /= sum;
}

int train_softmax(softmax_model *m, const dataset *ds, uint32_t seed, uint32_t round,
                  const train_settings *s)
{
    const uint32_t k = m->k, d = m->d, bs = s->batch_size ? s->batch_size : 32;
    uint32_t *perm = malloc(((size_t)ds->n + 1) * sizeof(uint32_t));
    double *P = malloc(((size_t)bs * k + 1) * sizeof(double));
    double *G = malloc(((size_t)d * k + 1) * sizeof(double));
    /* FedProx: the model the task named, which every step is pulled towards */
    double *W0 = s->mu > 0 ? malloc(((size_t)d * k + k + 1) * sizeof(double)) : NULL;
    uint32_t entropy[2] = {seed, round}, e, i;
    np_pcg64 rng;
    int rc = 0;
    if (perm == NULL || P == NULL || G == NULL || ds->d != d || (s->mu > 0 && W0 == NULL)) {
        rc = -1;
        goto out;
    }
    for (i = 0; i < ds->n; i++)
        if ((uint32_t)ds->y[i] >= k) {
            rc = -1;
            goto out;
        }
    if (W0 != NULL) {
        memcpy(W0, m->W, (size_t)d * k * sizeof(double));
        memcpy(W0 + (size_t)d * k, m->b, k * sizeof(double));
    }
    np_pcg64_seed(&rng, entropy, 2);
    for (e = 0; e < s->epochs; e++) {
        uint32_t start;
        np_permutation(&rng, perm, ds->n);
        for (start = 0; start < ds->n; start += bs) {
            uint32_t B = ds->n - start < bs ? ds->n - start : bs, r, j, c;
            /* P = softmax(Xb W + b); P[r, y_r] -= 1; P /= B */
            for (r = 0; r < B; r++) {
                uint32_t row = perm[start + r];
                double *p = P + (size_t)r * k;
                logits_row(m, ds->X + (size_t)row * d, p);
                softmax_row(p, k);
                p[ds->y[row]] -= 1.0;
                for (c = 0; c < k; c++)
                    p[c] /= (double)B;
            }
            /* W -= lr * Xb.T P;  b -= lr * P.sum(0)   (sums over the batch in row order) */
            memset(G, 0, (size_t)d * k * sizeof(double));
            for (r = 0; r < B; r++) {
                const double *x = ds->X + (size_t)perm[start + r] * d, *p = P + (size_t)r * k;
                for (j = 0; j < d; j++)
                    for (c = 0; c < k; c++)
                        G[(size_t)j * k + c] += x[j] * p[c];
            }
            /* with mu: gradient + mu (w - w_global), as numpy_models.train_epochs */
            for (j = 0; j < d * k; j++)
                m->W[j] -= s->lr * (W0 ? G[j] + s->mu * (m->W[j] - W0[j]) : G[j]);
            for (c = 0; c < k; c++) {
                double sum = 0.0;
                for (r = 0; r < B; r++)
                    sum += P[(size_t)r * k + c];
                if (W0 != NULL)
                    sum = sum + s->mu * (m->b[c] - W0[(size_t)d * k + c]);
                m->b[c] -= s->lr * sum;
            }
        }
    }
out:
    free(perm);
    free(P);
    free(G);
    free(W0);
    return rc;
}

void evaluate_softmax(const softmax_model *m, const dataset *ds, double *loss, double *accuracy)
{
    double *z = malloc(((size_t)m->k + 1) * sizeof(double)), total = 0.0;
    uint32_t i, c, hits = 0;
    *loss = *accuracy = 0.0;
    if (z == NULL || ds->n == 0) {
        free(z);
        return;
    }
    for (i = 0; i < ds->n; i++) {
        uint32_t best = 0;
        double p;
        logits_row(m, ds->X + (size_t)i * ds->d, z);
        for (c = 1; c < m->k; c++)
            if (z[c] > z[best])
                best = c;
        hits += best == (uint32_t)ds->y[i];
        softmax_row(z, m->k);
        p = z[ds->y[i]] < 1e-12 ? 1e-12 : z[ds->y[i]];
        total += log(p);
    }
    *loss = -total / ds->n;
    *accuracy = (double)hits / ds->n;
    free(z);
}
