// Writes k-quant quantizer reference vectors (tests/data/ggml_quant_Q{2..6}_K.bin) from ggml's own
// quantize_row_q*_K_ref, which gguf-py cannot run. Same TQV1 format as scripts/gen_quant_vectors.py (kind 1:
// f32 input, then the quantized bytes).
//
// Build against a llama.cpp checkout (tested with the one vendored in llama-cpp-python 0.3.36), with FMA
// contraction off so that every C float operator rounds once, as Rust does:
//
//   G=/path/to/llama.cpp/ggml
//   cc -O2 -ffp-contract=off -I$G/include -I$G/src kernels/tests/ggml_ref/gen_kquant_vectors.c \
//      $G/src/ggml-quants.c -lm -o /tmp/gen_kquant_vectors
//   /tmp/gen_kquant_vectors kernels/tests/data            # the committed vectors
//   /tmp/gen_kquant_vectors /tmp/kq 2000 7                # a larger sweep: 2000 random blocks, seed 7
//
// The second form writes one "sweep" case per type; point TESSERA_QUANT_VECTORS=/tmp/kq at it and run
// `cargo test -p tessera-kernels --test quant_reference ggml` to compare.

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-quants.h"

// ggml-quants.c calls these from ggml.c only on paths the *_ref quantizers never take.
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort %s:%d %s\n", file, line, fmt);
    abort();
}
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void) type; (void) ne; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void) type; return "?"; }
size_t ggml_type_size(enum ggml_type type) { (void) type; abort(); }

#define QK 256

static uint64_t rng_state;

static uint64_t splitmix64(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double uniform(void) { return ((double) (splitmix64() >> 11) + 0.5) / 9007199254740992.0; }

static float normal(void) {
    double u = uniform(), v = uniform();
    return (float) (sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

typedef void (*quantize_fn)(const float *, void *, int64_t);

struct qtype {
    const char * name;
    uint32_t id;
    size_t type_size;
    quantize_fn quantize;
};

static const struct qtype TYPES[] = {
    {"Q2_K", 10, 84, (quantize_fn) quantize_row_q2_K_ref},
    {"Q3_K", 11, 110, (quantize_fn) quantize_row_q3_K_ref},
    {"Q4_K", 12, 144, (quantize_fn) quantize_row_q4_K_ref},
    {"Q5_K", 13, 176, (quantize_fn) quantize_row_q5_K_ref},
    {"Q6_K", 14, 210, (quantize_fn) quantize_row_q6_K_ref},
};

struct input {
    const char * name;
    int n_blocks;
    float * x;
};

static void put_u32(FILE * f, uint32_t v) {
    uint8_t b[4] = {v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, v >> 24};
    fwrite(b, 1, 4, f);
}

static float * fill(int n_blocks, float sigma) {
    float * x = malloc(sizeof(float) * QK * n_blocks);
    for (int i = 0; i < QK * n_blocks; i++) x[i] = sigma * normal();
    return x;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT_DIR [SWEEP_BLOCKS [SEED]]\n", argv[0]);
        return 2;
    }
    int sweep = argc > 2 ? atoi(argv[2]) : 0;
    rng_state = argc > 3 ? strtoull(argv[3], NULL, 10) : 20240611;

    struct input inputs[8];
    int n_inputs = 0;
    if (sweep > 0) {
        // Mixed magnitudes so the sweep also covers subnormal and large f16 super-block scales.
        float * x = fill(sweep, 1.0f);
        for (int b = 0; b < sweep; b++) {
            float s = powf(10.0f, (float) (b % 9) - 5.0f);
            for (int i = 0; i < QK; i++) x[b * QK + i] *= s;
        }
        inputs[n_inputs++] = (struct input) {"sweep", sweep, x};
    } else {
        inputs[n_inputs++] = (struct input) {"normal", 2, fill(2, 1.0f)};
        inputs[n_inputs++] = (struct input) {"weights_scale", 1, fill(1, 0.02f)};
        inputs[n_inputs++] = (struct input) {"large", 1, fill(1, 3000.0f)};
        inputs[n_inputs++] = (struct input) {"zeros", 1, fill(1, 0.0f)};
        float * c = fill(1, 0.0f);
        for (int i = 0; i < QK; i++) c[i] = i < QK / 2 ? 0.75f : -3.0f;
        inputs[n_inputs++] = (struct input) {"constant_halves", 1, c};
        float * o = fill(1, 1.0f);
        for (int i = 0; i < QK; i += 37) o[i] *= 25.0f;
        inputs[n_inputs++] = (struct input) {"outliers", 1, o};
    }

    for (size_t t = 0; t < sizeof(TYPES) / sizeof(TYPES[0]); t++) {
        const struct qtype * ty = &TYPES[t];
        char path[4096];
        snprintf(path, sizeof(path), "%s/ggml_quant_%s.bin", argv[1], ty->name);
        FILE * f = fopen(path, "wb");
        if (!f) {
            perror(path);
            return 1;
        }
        fwrite("TQV1", 1, 4, f);
        put_u32(f, ty->id);
        put_u32(f, 1);
        put_u32(f, (uint32_t) n_inputs);
        for (int k = 0; k < n_inputs; k++) {
            const struct input * in = &inputs[k];
            size_t n = (size_t) QK * in->n_blocks, nbytes = ty->type_size * in->n_blocks;
            uint8_t * q = calloc(1, nbytes);
            ty->quantize(in->x, q, (int64_t) n);
            put_u32(f, (uint32_t) strlen(in->name));
            fwrite(in->name, 1, strlen(in->name), f);
            put_u32(f, (uint32_t) n);
            put_u32(f, (uint32_t) nbytes);
            fwrite(in->x, sizeof(float), n, f);  // little-endian hosts only
            fwrite(q, 1, nbytes, f);
            free(q);
        }
        fclose(f);
    }
    return 0;
}
