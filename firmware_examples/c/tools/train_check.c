/* train_check: the C training step and shuffle, exposed for the tests (not for devices).
 *
 *   train_check perm SEED ROUND N
 *       prints default_rng([SEED, ROUND]).permutation(N), one index a line
 *   train_check train DATA MODEL_IN MODEL_OUT SEED ROUND LR BATCH EPOCHS [MU]
 *       trains the CBOR tensor set MODEL_IN on DATA (EFLD), writes the result to MODEL_OUT
 *       and prints "loss accuracy" of the trained model on DATA
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "np_random.h"
#include "tensors.h"
#include "train.h"

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long len;
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0)
        return NULL;
    rewind(f);
    buf = malloc((size_t)len + 1);
    if (buf != NULL && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n = (size_t)len;
    return buf;
}

int main(int argc, char **argv)
{
    char err[256];
    if (argc == 5 && strcmp(argv[1], "perm") == 0) {
        uint32_t e[2] = {(uint32_t)strtoul(argv[2], NULL, 10), (uint32_t)strtoul(argv[3], NULL, 10)};
        uint32_t n = (uint32_t)strtoul(argv[4], NULL, 10), i, *out = malloc(((size_t)n + 1) * 4);
        np_pcg64 g;
        np_pcg64_seed(&g, e, 2);
        np_permutation(&g, out, n);
        for (i = 0; i < n; i++)
            printf("%u\n", out[i]);
        free(out);
        return 0;
    }
    if ((argc == 10 || argc == 11) && strcmp(argv[1], "train") == 0) {
        dataset ds;
        softmax_model m;
        train_settings s = {atof(argv[7]), (uint32_t)atoi(argv[8]), (uint32_t)atoi(argv[9]),
                            argc == 11 ? atof(argv[10]) : 0.0};
        size_t n;
        uint8_t *blob;
        cbor_out o;
        double loss, acc;
        FILE *f;
        if (dataset_load(argv[2], &ds, err, sizeof err) != 0 || (blob = slurp(argv[3], &n)) == NULL ||
            tensors_decode_softmax(blob, n, &m, err, sizeof err) != 0) {
            fprintf(stderr, "train_check: %s\n", err);
            return 1;
        }
        free(blob);
        if (train_softmax(&m, &ds, (uint32_t)strtoul(argv[5], NULL, 10),
                          (uint32_t)strtoul(argv[6], NULL, 10), &s) != 0) {
            fprintf(stderr, "train_check: training failed\n");
            return 1;
        }
        evaluate_softmax(&m, &ds, &loss, &acc);
        co_init(&o, 8192);
        tensors_encode_softmax(&o, &m);
        f = fopen(argv[4], "wb");
        if (f == NULL || fwrite(o.buf, 1, o.len, f) != o.len) {
            fprintf(stderr, "train_check: cannot write %s\n", argv[4]);
            return 1;
        }
        fclose(f);
        printf("%.17g %.17g\n", loss, acc);
        co_free(&o);
        model_free(&m);
        dataset_free(&ds);
        return 0;
    }
    fprintf(stderr, "usage: train_check perm SEED ROUND N | train DATA IN OUT SEED ROUND LR BATCH EPOCHS [MU]\n");
    return 2;
}
