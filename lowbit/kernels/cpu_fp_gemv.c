/* Few-row matmuls over FP8 E4M3, INT8 and NVFP4 weights on the CPU, decoding the codes in registers.
 *
 * Compiled and loaded at run time by lowbit/kernels/cpu_fp.py (cc -O3 -march=native -fopenmp); plain C with an
 * AVX-512 path. Rows of x (M, K) float32, weight (N, K), out (M, N) float32, parallel over N (OpenMP):
 *
 *   fp8:   out[m, n] = (sum_k x[m, k] * e4m3(codes[n, k])) / divisor[n or 0]
 *   int8:  out[m, n] = (sum_k x[m, k] * int8(codes[n, k])) / divisor[n or 0]
 *   nvfp4: out[m, n] = sum_k x[m, k] * fl32(e2m1(nibble(n, k)) * fl32(e4m3(block_scale[n, k / 16]) * global))
 *
 * The E4M3 / E2M1 values are exact in float32; the products and sums round in float32. NVFP4's weight is the
 * same float32 products PackedWeight.dequantize forms (the block scale, then the e2m1 value times it). Nibble k of a
 * row is the low half of byte k / 2 for even k, the high half for odd k. E4M3 code 0x7F / 0xFF (NaN) never
 * occurs in lowbit's saturating codes; the AVX-512 decoder reads it as 480 (the table as NaN).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LOWBIT_AVX512 1
#endif

#define ROW_TILE 4 /* rows of x sharing one decoded weight vector (lowbit_cpu_fp.GEMV_MAX_ROWS) */
/* Independent accumulators per row: one FMA chain would wait its latency (4 cycles) per 16 weights and cap a core
 * at ~12 GB/s of one-byte codes, under the memory's rate; four chains let the loads run ahead. */
#define CHAINS 4
/* Smaller weights run on the calling thread: a fork and join costs more than they take (and on a shared machine a
 * descheduled worker stalls the join). */
#define PARALLEL_MIN_WEIGHTS (1 << 18)

/* E4M3 as float16 is the same bits shifted by 7 with the exponent bias 15 instead of 7: value * 2**-8, exact
 * for subnormals too. */
#ifdef LOWBIT_AVX512
static inline __m512 e4m3_times_2_pow_minus_8(const uint8_t *codes) {
    __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)codes));
    __m256i magnitude = _mm256_slli_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x7F)), 7);
    __m256i sign = _mm256_slli_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(0x80)), 8);
    return _mm512_cvtph_ps(_mm256_or_si256(magnitude, sign));
}

/* One NVFP4 block: the 16 E2M1 values of 8 bytes (element 2j in byte j's low nibble) times the block's scale s. */
static inline __m512 nvfp4_block(const uint8_t *bytes8, __m512 values, float s) {
    uint64_t packed;
    memcpy(&packed, bytes8, 8);
    __m128i bytes = _mm_cvtsi64_si128((long long)packed);
    __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    __m512i nibbles = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high));
    return _mm512_mul_ps(_mm512_permutexvar_ps(nibbles, values), _mm512_set1_ps(s));
}
#endif

#ifdef LOWBIT_AVX512
static inline __attribute__((always_inline)) void zero_chains(__m512 acc[ROW_TILE][CHAINS], const int rows) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < CHAINS; c++) acc[r][c] = _mm512_setzero_ps();
}

/* sums[r] = the sum of row r's chains' lanes. */
static inline __attribute__((always_inline)) void reduce_chains(__m512 acc[ROW_TILE][CHAINS], const int rows,
                                                                 float *sums) {
    for (int r = 0; r < rows; r++) {
        __m512 total = acc[r][0];
        for (int c = 1; c < CHAINS; c++) total = _mm512_add_ps(total, acc[r][c]);
        sums[r] = _mm512_reduce_add_ps(total);
    }
}

/* 16 weights of one-byte codes as float32: E4M3 values (fp8) or signed integers (int8), exact. */
static inline __m512 byte_codes(const uint8_t *codes, int int8) {
    if (int8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
    return _mm512_mul_ps(e4m3_times_2_pow_minus_8(codes), _mm512_set1_ps(256.0f));
}
#endif

/* sums[r] = sum_k xm[r * K + k] * value(row[k]) for r < rows, value the code's E4M3 value (``table``) or, with
 * ``int8``, the code as a signed integer. Always inlined with constant ``rows`` and ``int8`` (``byte_codes_gemv``'s
 * switch): the accumulators then live in registers, not on the stack. */
static inline __attribute__((always_inline)) void byte_codes_dot(const float *xm, const uint8_t *row,
                                                                  const float *table, int64_t K, float *sums,
                                                                  const int rows, const int int8) {
    int64_t k = 0;
#ifdef LOWBIT_AVX512
    __m512 acc[ROW_TILE][CHAINS];
    zero_chains(acc, rows);
    for (; k + 16 * CHAINS <= K; k += 16 * CHAINS)
        for (int c = 0; c < CHAINS; c++) {
            __m512 w = byte_codes(row + k + 16 * c, int8);
            for (int r = 0; r < rows; r++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + r * K + k + 16 * c), w, acc[r][c]);
        }
    for (; k + 16 <= K; k += 16) {
        __m512 w = byte_codes(row + k, int8);
        for (int r = 0; r < rows; r++) acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + r * K + k), w, acc[r][0]);
    }
    reduce_chains(acc, rows, sums);
#else
    for (int r = 0; r < rows; r++) sums[r] = 0.0f;
#endif
    for (; k < K; k++) {
        float w = int8 ? (float)(int8_t)row[k] : table[row[k]];
        for (int r = 0; r < rows; r++) sums[r] += xm[r * K + k] * w;
    }
}

#define BYTE_CODES_DOT(ROWS)                                                   \
    (int8 ? byte_codes_dot(xm, row, table, K, sums, ROWS, 1)                  \
          : byte_codes_dot(xm, row, table, K, sums, ROWS, 0))

/* out[m, n] = (sum_k x[m, k] * value(codes[n, k])) / divisor[n or 0] (``byte_codes_dot``'s values: E4M3 from
 * ``table``, or with ``int8`` the signed integer codes). */
void lowbit_byte_codes_gemv(const float *x, const uint8_t *codes, const float *table, const float *divisor,
                            int64_t divisor_per_row, int64_t M, int64_t N, int64_t K, float *out, int int8) {
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * K;
        float d = divisor[divisor_per_row ? n : 0];
        for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
            int64_t rows = M - m0 < ROW_TILE ? M - m0 : ROW_TILE;
            const float *xm = x + m0 * K;
            float sums[ROW_TILE];
            switch (rows) {
                case 1: BYTE_CODES_DOT(1); break;
                case 2: BYTE_CODES_DOT(2); break;
                case 3: BYTE_CODES_DOT(3); break;
                default: BYTE_CODES_DOT(4); break;
            }
            for (int64_t r = 0; r < rows; r++) out[(m0 + r) * N + n] = sums[r] / d;
        }
    }
}

/* 1 where the vector path was compiled in (INT8 takes this kernel only then: torch's own beats the scalar loop). */
int lowbit_has_avx512(void) {
#ifdef LOWBIT_AVX512
    return 1;
#else
    return 0;
#endif
}

/* FP8 W8A8 from float32 activations: x's E4M3 values e4m3(x / x_step) (round to nearest even, saturating at
 * +-448: lowbit.formats.minifloat's rule, the step of the value's binade, at least the subnormals' 2**-9), then
 * lowbit_byte_codes_gemv. NaN stays NaN. */
static inline float e4m3_round(float value) {
    float magnitude = fabsf(value) > 448.0f ? 448.0f : fabsf(value);
    uint32_t bits;
    memcpy(&bits, &magnitude, 4);
    bits &= 0x7F800000u;
    if (bits < (121u << 23)) bits = 121u << 23; /* 2**-6, E4M3's smallest normal binade */
    bits -= 3u << 23;                          /* step: 2**(exponent - 3 mantissa bits) */
    float step;
    memcpy(&step, &bits, 4);
    return copysignf(rintf(magnitude / step) * step, value);
}

int lowbit_fp8_w8a8_gemv(const float *x, float x_step, const uint8_t *codes, const float *table,
                         const float *divisor, int64_t divisor_per_row, int64_t M, int64_t N, int64_t K, float *out) {
    float *values = malloc((size_t)(M * K) * sizeof(float));
    if (values == NULL) return 1;
    for (int64_t i = 0; i < M * K; i++) values[i] = e4m3_round(x[i] / x_step);
    lowbit_byte_codes_gemv(values, codes, table, divisor, divisor_per_row, M, N, K, out, 0);
    free(values);
    return 0;
}

/* sums[r] = sum_k xm[r * K + k] * fl32(e2m1(nibble k of row) * fl32(e4m3(row_scale[k / 16]) * global)), r < rows;
 * inlined with constant ``rows`` (as ``byte_codes_dot``). */
static inline __attribute__((always_inline)) void nvfp4_dot(const float *xm, const uint8_t *row,
                                                             const uint8_t *row_scale, const float *table,
                                                             const float *e4m3_table, float global_scale,
                                                             int64_t K, float *sums, const int rows) {
    int64_t blocks = K / 16;
#ifdef LOWBIT_AVX512
    __m512 values = _mm512_loadu_ps(table);
    __m512 acc[ROW_TILE][CHAINS];
    zero_chains(acc, rows);
    int64_t b = 0;
    for (; b + CHAINS <= blocks; b += CHAINS)
        for (int c = 0; c < CHAINS; c++) {
            __m512 w = nvfp4_block(row + 8 * (b + c), values, e4m3_table[row_scale[b + c]] * global_scale);
            for (int r = 0; r < rows; r++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + r * K + 16 * (b + c)), w, acc[r][c]);
        }
    for (; b < blocks; b++) {
        __m512 w = nvfp4_block(row + 8 * b, values, e4m3_table[row_scale[b]] * global_scale);
        for (int r = 0; r < rows; r++) acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + r * K + 16 * b), w, acc[r][0]);
    }
    reduce_chains(acc, rows, sums);
#else
    for (int r = 0; r < rows; r++) sums[r] = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        uint8_t byte = row[k / 2];
        float w = table[(k & 1) ? byte >> 4 : byte & 0x0F] * (e4m3_table[row_scale[k / 16]] * global_scale);
        for (int r = 0; r < rows; r++) sums[r] += xm[r * K + k] * w;
    }
#endif
}

void lowbit_nvfp4_gemv(const float *x, const uint8_t *codes, const float *table, const uint8_t *block_scale,
                       const float *e4m3_table, float global_scale, int64_t M, int64_t N, int64_t K, float *out) {
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * (K / 2);
        const uint8_t *row_scale = block_scale + n * (K / 16);
        for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE) {
            int64_t rows = M - m0 < ROW_TILE ? M - m0 : ROW_TILE;
            const float *xm = x + m0 * K;
            float sums[ROW_TILE];
            switch (rows) {
                case 1: nvfp4_dot(xm, row, row_scale, table, e4m3_table, global_scale, K, sums, 1); break;
                case 2: nvfp4_dot(xm, row, row_scale, table, e4m3_table, global_scale, K, sums, 2); break;
                case 3: nvfp4_dot(xm, row, row_scale, table, e4m3_table, global_scale, K, sums, 3); break;
                default: nvfp4_dot(xm, row, row_scale, table, e4m3_table, global_scale, K, sums, 4); break;
            }
            for (int64_t r = 0; r < rows; r++) out[(m0 + r) * N + n] = sums[r];
        }
    }
}

/* The weight in bfloat16 for many-row products (then torch's matmul): out[n, k] = bf16(w[n, k]) with w the
 * float32 weight of the formulas above (fp8: fl32(e4m3 / divisor), as formats.dequantize_fp) and bf16 rounding to
 * nearest even, as torch's cast (no NaN or inf occurs). */
static inline uint16_t bf16_nearest_even(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

#ifdef LOWBIT_AVX512
static inline void store_bf16(uint16_t *out, __m512 value) {
    __m512i bits = _mm512_castps_si512(value);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#endif

void lowbit_fp8_dequantize_bf16(const uint8_t *codes, const float *table, const float *divisor,
                                int64_t divisor_per_row, int64_t N, int64_t K, uint16_t *out) {
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * K;
        float d = divisor[divisor_per_row ? n : 0];
        int64_t k = 0;
#ifdef LOWBIT_AVX512
        for (; k + 16 <= K; k += 16) {
            __m512 w = _mm512_mul_ps(e4m3_times_2_pow_minus_8(row + k), _mm512_set1_ps(256.0f));
            store_bf16(out + n * K + k, _mm512_div_ps(w, _mm512_set1_ps(d)));
        }
#endif
        for (; k < K; k++) out[n * K + k] = bf16_nearest_even(table[row[k]] / d);
    }
}

void lowbit_nvfp4_dequantize_bf16(const uint8_t *codes, const float *table, const uint8_t *block_scale,
                                  const float *e4m3_table, float global_scale, int64_t N, int64_t K, uint16_t *out) {
    int64_t blocks = K / 16;
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WEIGHTS)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * (K / 2);
        for (int64_t b = 0; b < blocks; b++) {
            float s = e4m3_table[block_scale[n * blocks + b]] * global_scale;
#ifdef LOWBIT_AVX512
            store_bf16(out + n * K + 16 * b, nvfp4_block(row + 8 * b, _mm512_loadu_ps(table), s));
#else
            for (int64_t j = 0; j < 16; j++) {
                uint8_t byte = row[8 * b + j / 2];
                out[n * K + 16 * b + j] = bf16_nearest_even(table[(j & 1) ? byte >> 4 : byte & 0x0F] * s);
            }
#endif
        }
    }
}
