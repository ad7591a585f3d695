#pragma once
// CPU kernels of the inference weight types (BF16 and Q8 matrices with F32 activations) and of
// the BF16 key/value cache. Implemented in kernels/cpu/quant.cpp and
// kernels/cpu/attention_cached_bf16.cpp; the CPU backend is their caller.
//
// Q8 layout. A (rows, cols) matrix, cols a multiple of 32, is rows of q8_row_bytes(cols) bytes
// each, back to back. Element c of a row is s[c / 32] * q[c]: groups of 32 int8 values q with
// one F32 scale s each (little endian). Quantizing takes s = max |x| / 127 over the group and
// q = round-to-nearest-even(x / s) (all zero when the group is). A row is blocks of 16 groups,
// the last holding the rest when cols / 32 is not a multiple of 16. A block of n groups is 8
// chunks of 4 n bytes, chunk k holding values 4k .. 4k + 3 of each of its n groups in turn,
// then the n groups' scales: the int8 dot product of a chunk with x sums each group in its own
// lane, and the row is read once, in order (files keep values and scales apart: pack_q8).
//
// BF16 is the top half of an F32 (uint16 bits); conversions from F32 round to nearest even.
//
// Every kernel here has an AVX-512 path and a portable one, chosen at run time: the AVX-512
// functions are compiled for that ISA by target attributes whatever the build's -march, and run
// only when cpuid reports it, so one binary runs on any x86-64 machine. The environment variable
// SUBLLM_PORTABLE_KERNELS=1 (or set_portable_kernels) forces the portable ones. Both paths give
// what the F32 kernels give on the dequantized weights, up to the order of the sums.
//
// Q8 products round their activations too: every x row is quantized as a weight row is (a scale
// per 32, round to nearest even) before it meets W, so y = dequant(quant(x)) · dequant(W)^T on
// every path and for every row count. Where the machine has AVX-512 VNNI, the matrix-vector
// path multiplies the int8 values with the int8 dot product and scales exact integer group sums;
// elsewhere the F32 kernels take the rounded x.
#include <cstddef>
#include <cstdint>

namespace subllm::kernels {

constexpr int kQ8Group = 32;
constexpr size_t q8_row_bytes(int64_t cols) { return (size_t)cols + (size_t)cols / kQ8Group * sizeof(float); }

// Whether the AVX-512 paths run (the machine has AVX-512 F/BW/VL and they are not forced off).
bool fast_kernels_active();
// Forces the portable paths (true) or lets the machine decide again (false). Tests use it.
void set_portable_kernels(bool portable);
// Whether Q8 matrix-vector products may use the AVX-512 int8 dot product (VNNI) where the
// machine has it (true, the default) or take the AVX-512 F32 path. Tests use it.
void set_vnni_kernels(bool allowed);

// ---- conversions ------------------------------------------------------------------------
// dst (rows, q8_row_bytes(cols)) from src (rows, cols) F32, cols % 32 == 0.
void quantize_q8(const float* src, int64_t rows, int cols, void* dst);
// dst (rows, cols) F32 from Q8 rows.
void dequantize_q8(const void* src, int64_t rows, int cols, float* dst);
// Q8 rows dst from their int8 values (rows, cols) and F32 scales (rows, cols / 32) in row
// order, the form of the files, and back.
void pack_q8(const int8_t* values, const float* scales, int64_t rows, int cols, void* dst);
void unpack_q8(const void* src, int64_t rows, int cols, int8_t* values, float* scales);
void f32_to_bf16(const float* src, uint16_t* dst, int64_t n);
void bf16_to_f32(const uint16_t* src, float* dst, int64_t n);

// ---- dense algebra on inference weights ---------------------------------------------------
// y(n, out) (=|+=) x(n, in) · W(out, in)^T, W in BF16 (row stride ldw elements) or Q8 (dense
// rows; x rounded as above). Up to 4 rows are matrix-vector products that stream W once; more
// rows go through the F32 GEMM on tiles of W dequantized on the stack.
void linear_forward_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, float* y, int64_t ldy, int n,
                         int in, int out, bool accumulate);
void linear_forward_q8(const float* x, int64_t ldx, const void* w, float* y, int64_t ldy, int n, int in, int out,
                       bool accumulate);

// The output head in inference: loss (and, when `logits`, the (n, V) logits) of x(n, C)
// against a BF16 or Q8 head w(V, C); `scratch` (chunk_rows, V) floats; targets < 0 ignored.
// Returns the summed loss over counted rows; `count` gets their number.
double lm_head_loss_bf16(const float* x, const uint16_t* w, const int32_t* targets, int n, int C, int V,
                         float* logits, float* scratch, int chunk_rows, int64_t* count);
double lm_head_loss_q8(const float* x, const void* w, const int32_t* targets, int n, int C, int V, float* logits,
                       float* scratch, int chunk_rows, int64_t* count);

// out(n, C) = rows tokens[i] of a BF16 or Q8 table (V, C), as F32.
void embedding_forward_bf16(const int32_t* tokens, const uint16_t* table, float* out, int n, int C);
void embedding_forward_q8(const int32_t* tokens, const void* table, float* out, int n, int C);

// ---- attention over a BF16 key/value cache -------------------------------------------------
// attention_cached (kernels.h) with k, v (L, ld_kv) in BF16, query head h reading key/value
// head h / (H / Hkv); scratch as there.
void attention_cached_bf16(const float* q, int ld_q, int m, const uint16_t* k, const uint16_t* v, int ld_kv, int L,
                           int H, int Hkv, int hd, float* out, int ld_o, float* scratch);

}  // namespace subllm::kernels
