/* Shared by the native cpu kernels (sparse_rows.c, decode_ops.c): bf16 <-> fp32 with
 * torch's rounding, and LOAD_<type> / STORE_<type> names the kernel macros paste together. */
#ifndef EDGESPARSE_COMMON_H
#define EDGESPARSE_COMMON_H
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#define LOAD_F32(v) (v)
#define STORE_F32(v) (v)
#define LOAD_bf16 bf16_to_f32
#define LOAD_f32 LOAD_F32
#define STORE_bf16 f32_to_bf16
#define STORE_f32 STORE_F32

#endif
