/* The stored test vectors (tests/backends/arm/vectors.py: inputs and the torch reference's
 * outputs, made on x86): each record's kernel runs on its inputs and is compared with the
 * stored output by check().  The same file is read by the native build and by both aarch64
 * builds under qemu. */
#include "check.h"

typedef struct {
    int kind, p[8];
    float tol;
    int n_arrays;
    void *a[8];
    int64_t len[8];
} Record;

static int read_record(FILE *f, Record *r) {
    if (fread(&r->kind, 4, 1, f) != 1 || fread(r->p, 4, 8, f) != 8 || fread(&r->tol, 4, 1, f) != 1 ||
        fread(&r->n_arrays, 4, 1, f) != 1 || r->n_arrays > 8)
        return 0;
    for (int i = 0; i < r->n_arrays; i++) {
        if (fread(&r->len[i], 8, 1, f) != 1) return 0;
        r->a[i] = malloc((size_t)r->len[i] + 64);   /* + 64: a kernel may load a vector past an odd end */
        if ((size_t)r->len[i] && fread(r->a[i], 1, (size_t)r->len[i], f) != (size_t)r->len[i]) return 0;
    }
    return 1;
}

static void compare(const char *what, const Record *r, const float *got, const float *want, int len) {
    double *w = malloc(sizeof(double) * (size_t)(len ? len : 1));
    for (int i = 0; i < len; i++) w[i] = want[i];
    check(what, r->p[0], r->p[1], r->p[2], got, w, len, r->tol);
    free(w);
}

static void to_f32(const uint16_t *in, float *out, int n) {
    for (int i = 0; i < n; i++) out[i] = from_bf16(in[i]);
}

#define BY_FMT(fmt, name, ...)                                                                    \
    do {                                                                                          \
        if ((fmt) == Q8) es_##name##_q8(__VA_ARGS__);                                            \
        else if ((fmt) == Q4) es_##name##_q4(__VA_ARGS__);                                       \
        else es_##name##_q41(__VA_ARGS__);                                                       \
    } while (0)

static void run(const Record *r, int nt) {
    const int *p = r->p;
    float *out = malloc(sizeof(float) * 4096);
    uint16_t *o16 = malloc(sizeof(uint16_t) * 4096);
    int64_t counts[2];
    switch (r->kind) {
    case 1:   /* GEMV: w, x, want */
        BY_FMT(p[0], gemv, r->a[0], r->a[1], NULL, p[1], p[2], nt, out);
        compare("vectors: gemv", r, out, r->a[2], p[1]);
        break;
    case 2:   /* row sums over idx (m rows): w, idx, coef, want */
        BY_FMT(p[0], weighted_rows, r->a[0], r->a[1], r->a[2], p[3], p[2], nt, out);
        compare("vectors: row sums", r, out, r->a[3], p[2]);
        break;
    case 3:   /* Top-K linear: w_t [d_in, d_out], x, want */
        BY_FMT(p[0], topk_linear, r->a[0], r->a[1], p[1], p[2], p[3], nt, out);
        compare("vectors: top-k linear", r, out, r->a[2], p[2]);
        break;
    case 4:   /* RMSNorm fp32: x, w, want */
        es_rms_norm_f32(r->a[0], r->a[1], 1e-5f, p[0], out);
        compare("vectors: rms norm f32", r, out, r->a[2], p[0]);
        break;
    case 5: { /* RMSNorm bf16: x, w, want (fp32) */
        es_rms_norm_bf16(r->a[0], r->a[1], 1e-5f, p[0], o16);
        to_f32(o16, out, p[0]);
        compare("vectors: rms norm bf16", r, out, r->a[2], p[0]);
        break;
    }
    case 6: case 7: { /* attention: qkv, cos, sin, cache_k, cache_v, want out, want cache_k */
        const int nh = p[0], nkv = p[1], hd = p[2], L = p[3], slot = p[4], first = p[5];
        const int64_t cl = (int64_t)nkv * L * hd * (r->kind == 6 ? 4 : 2);
        void *ck = malloc((size_t)cl), *cv = malloc((size_t)cl);
        memcpy(ck, r->a[3], (size_t)cl); memcpy(cv, r->a[4], (size_t)cl);
        float *kf = malloc(sizeof(float) * (size_t)nkv * L * hd);
        if (r->kind == 6) {
            es_decode_attention_f32(r->a[0], r->a[1], r->a[2], ck, cv, nh, nkv, hd, L, slot, first, nt, out);
            memcpy(kf, ck, sizeof(float) * (size_t)nkv * L * hd);
        } else {
            es_decode_attention_bf16(r->a[0], r->a[1], r->a[2], ck, cv, nh, nkv, hd, L, slot, first, nt, o16);
            to_f32(o16, out, nh * hd);
            to_f32(ck, kf, nkv * L * hd);
        }
        compare(r->kind == 6 ? "vectors: attention f32" : "vectors: attention bf16", r, out, r->a[5], nh * hd);
        compare("vectors: attention cache", r, kf, r->a[6], nkv * L * hd);
        free(ck); free(cv); free(kf);
        break;
    }
    case 8:   /* exact ReGLU FFN: gate, up, down_t, x, want */
        if (p[0] == Q8)
            es_reglu_ffn_q8_q8(r->a[3], NULL, NULL, NULL, NULL, NULL, NULL, NULL, r->a[0], r->a[1], r->a[2], p[2], 0,
                               p[1], nt, 0.f, out, counts);
        else
            es_reglu_ffn_q4_q4(r->a[3], NULL, NULL, NULL, NULL, NULL, NULL, NULL, r->a[0], r->a[1], r->a[2], p[2], 0,
                               p[1], nt, 0.f, out, counts);
        compare("vectors: reglu ffn", r, out, r->a[4], p[2]);
        break;
    case 9:   /* bf16 weights' GEMV: w, x, want */
        es_gemv_bf16(r->a[0], r->a[1], NULL, p[0], p[1], nt, o16);
        to_f32(o16, out, p[0]);
        compare("vectors: gemv bf16", r, out, r->a[2], p[0]);
        break;
    default:
        printf("FAIL vectors: unknown record kind %d\n", r->kind);
        fails++;
    }
    free(out); free(o16);
}

/* every record of the file at `path`, with one and two threads; returns the records read */
int check_vectors(const char *path) {
    FILE *f = fopen(path, "rb");
    char magic[6];
    int count = 0, done = 0;
    if (!f || fread(magic, 1, 6, f) != 6 || memcmp(magic, "ESVEC1", 6) || fread(&count, 4, 1, f) != 1) {
        printf("FAIL vectors: cannot read %s\n", path);
        fails++;
        if (f) fclose(f);
        return 0;
    }
    for (; done < count; done++) {
        Record r;
        if (!read_record(f, &r)) {
            printf("FAIL vectors: record %d of %s is truncated\n", done, path);
            fails++;
            break;
        }
        for (int nt = 1; nt <= 2; nt++) run(&r, nt);
        for (int i = 0; i < r.n_arrays; i++) free(r.a[i]);
    }
    fclose(f);
    return done;
}
