// Register-blocked kernels for the thin products of low-rank layers (LoRA's rank r, an adapter's bottleneck):
// one side of every product is small (n = 3..128), the other is a long [rows, C] stream. BLAS is tuned for
// big square-ish GEMMs; on these shapes MKL ran ~2x off the memory bound (LoRA) or at ~60% of the FMA peak
// (adapter), so the three shapes below are written out with the small operand held in registers / L1:
//
//   project_rows     C[i, :n]  = alpha * X[i, :] @ Bt[:, :n] (+ bias)    X [m, K] streamed, Bt [K, n_pad]
//   expand_rows      out[i, :] = init[i, :] + alpha * coef[i, :n] @ basis[:n, :]       (basis [n, C] in L1)
//   accumulate_outer D[:n, :] += coef[:, :n]^T @ rows                   rows [m, C] streamed, D tile in regs
//
// Each works on one block of rows, single-threaded; callers split rows over threads (and give each thread
// its own D for accumulate_outer). Only float and double (at::vec); other dtypes stay on BLAS.
// Accumulation order: a plain running sum per output element, in the element type (fp32/fp64), as BLAS does.
#pragma once

#include "cpu/_vec.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastft {
namespace low_rank {

using at::vec::Vectorized;

// The element types these kernels cover (fp32, fp64); callers keep BLAS for the others (fp16/bf16, which
// BLAS accumulates in fp32).
template <typename T>
constexpr bool kCovers = std::is_same_v<T, float> || std::is_same_v<T, double>;

inline bool covers(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

template <typename T>
constexpr int64_t vec_size() {
  return Vectorized<T>::size();
}

// Columns of Bt that project_rows reads: n rounded up to whole vectors (the pad columns must be zero).
template <typename T>
inline int64_t padded_width(int64_t n) {
  return (n + vec_size<T>() - 1) / vec_size<T>() * vec_size<T>();
}

// dst[j, i] = m[i, j] for a 2-D float/double m of any strides; dst rows have stride ldd (>= m's rows).
// Blocked, so neither side is walked with a page-sized stride per element: Tensor::contiguous() on a
// transposed [64, 1024] weight took ~45 us per call here, this ~5x less.
template <typename T>
void transpose_into(const at::Tensor& m, T* dst, int64_t ldd) {
  const int64_t rows = m.size(0), cols = m.size(1), rs = m.stride(0), cs = m.stride(1);
  const T* src = m.data_ptr<T>();
  constexpr int64_t kBlock = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
      const int64_t j1 = std::min(cols, j0 + kBlock);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * ldd + i] = src[i * rs + j * cs];
    }
  }
}

// m^T as a new contiguous [cols, width] tensor (width >= rows; the columns past `rows` are zero).
template <typename T>
at::Tensor transposed(const at::Tensor& m, int64_t width) {
  const int64_t rows = m.size(0), cols = m.size(1);
  at::Tensor out = width > rows ? at::zeros({cols, width}, m.options()) : at::empty({cols, width}, m.options());
  transpose_into<T>(m, out.data_ptr<T>(), width);
  return out;
}

// basis_t [K, n] as project_rows reads it: contiguous, columns zero-padded to padded_width<T>(n) (a copy
// only when that changes anything; these operands are small). Pass weight.t() views as they are.
template <typename T>
at::Tensor projection_operand(const at::Tensor& basis_t) {
  const int64_t n = basis_t.size(1), width = padded_width<T>(n);
  if (width == n && basis_t.is_contiguous()) return basis_t;
  return transposed<T>(basis_t.t(), width);
}

// ---------------------------------------------------------------------------------------------
// The micro-kernel of all three: acc[r][v] += sum_k A(r, k) * B[k, v*W ...] for an MR x NV-vector tile held in
// registers for the whole k sweep; per k, NV loads of B's row k and MR broadcasts of A(r, k) feed MR*NV FMAs.
// A(r, k) = A[r * a_rs + k * a_ks] (project/expand: row-major A; accumulate_outer: A transposed).
// PARTIAL: one vector with only `count` valid columns (the last columns of a row of B).
// ---------------------------------------------------------------------------------------------
template <typename T, int MR, int NV, bool PARTIAL>
inline void gemm_tile(const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb, int64_t K, int64_t count,
                      Vectorized<T> (&acc)[MR][NV]) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = PARTIAL ? Vec::loadu(B + k * ldb, count) : Vec::loadu(B + k * ldb + v * W);
    for (int r = 0; r < MR; ++r) {
      const Vec a(A[r * a_rs + k * a_ks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
}

template <typename T, int MR, int NV>
inline void zero_tile(Vectorized<T> (&acc)[MR][NV]) {
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vectorized<T>(T(0));
}

// project_rows' tile: C[r, :] = alpha * X[r, :] @ Bt (+ bias) for MR rows and NV vectors of outputs.
template <typename T, int MR, int NV>
inline void project_tile(const T* X, int64_t ldx, const T* Bt, int64_t ldb, int64_t K, int64_t n_valid, T alpha,
                         const T* bias, T* C, int64_t ldc) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc[MR][NV];
  zero_tile<T, MR, NV>(acc);
  gemm_tile<T, MR, NV, false>(X, ldx, 1, Bt, ldb, K, W, acc);
  const Vec av(alpha);
  for (int v = 0; v < NV; ++v) {
    const int64_t count = std::min<int64_t>(W, n_valid - v * W);
    if (count <= 0) break;
    const Vec bv = bias ? Vec::loadu(bias + v * W, count) : Vec(T(0));
    for (int r = 0; r < MR; ++r) at::vec::fmadd(av, acc[r][v], bv).store(C + r * ldc + v * W, count);
  }
}

template <typename T, int NV>
inline void project_rows_nv(const T* X, int64_t ldx, int64_t m, const T* Bt, int64_t ldb, int64_t K, int64_t n_valid,
                            T alpha, const T* bias, T* C, int64_t ldc) {
  constexpr int MR = NV == 1 ? 8 : NV == 4 ? 6 : 4;  // enough independent accumulators to cover the FMA latency
  int64_t i = 0;
  for (; i + MR <= m; i += MR)
    project_tile<T, MR, NV>(X + i * ldx, ldx, Bt, ldb, K, n_valid, alpha, bias, C + i * ldc, ldc);
  for (; i < m; ++i) project_tile<T, 1, NV>(X + i * ldx, ldx, Bt, ldb, K, n_valid, alpha, bias, C + i * ldc, ldc);
}

// C[i, j] = alpha * sum_k X[i, k] * Bt[k, j] (+ bias[j]) for i < m, j < n. Bt has padded_width<T>(n) columns
// (row stride ldb >= that), the ones past n zero; bias (or nullptr) has n entries.
template <typename T>
void project_rows(const T* X, int64_t ldx, int64_t m, const T* Bt, int64_t ldb, int64_t K, int64_t n, T alpha,
                  const T* bias, T* C, int64_t ldc) {
  constexpr int64_t W = vec_size<T>();
  for (int64_t j0 = 0; j0 < n; j0 += 4 * W) {
    const int64_t nv = std::min<int64_t>(4, (n - j0 + W - 1) / W);
    const int64_t n_valid = n - j0;
    const T* b = bias ? bias + j0 : nullptr;
    switch (nv) {
      case 1: project_rows_nv<T, 1>(X, ldx, m, Bt + j0, ldb, K, n_valid, alpha, b, C + j0, ldc); break;
      case 2: project_rows_nv<T, 2>(X, ldx, m, Bt + j0, ldb, K, n_valid, alpha, b, C + j0, ldc); break;
      case 3: project_rows_nv<T, 3>(X, ldx, m, Bt + j0, ldb, K, n_valid, alpha, b, C + j0, ldc); break;
      default: project_rows_nv<T, 4>(X, ldx, m, Bt + j0, ldb, K, n_valid, alpha, b, C + j0, ldc); break;
    }
  }
}

// expand_rows' tile: out[r, :] = init[r, :] + alpha * coef[r, :n] @ basis for MR rows and NV vectors of
// columns (PARTIAL: the last `count` columns); the [n, NV*W] basis panel stays in L1 while row tiles go by.
template <typename T, int MR, int NV, bool PARTIAL>
inline void expand_tile(const T* coef, int64_t ldc, const T* basis, int64_t ldb, int64_t n, T alpha, const T* init,
                        int64_t ldi, T* out, int64_t ldo, int64_t count) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc[MR][NV];
  zero_tile<T, MR, NV>(acc);
  gemm_tile<T, MR, NV, PARTIAL>(coef, ldc, 1, basis, ldb, n, count, acc);
  const Vec av(alpha);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      if (PARTIAL) {
        const Vec base = init ? Vec::loadu(init + r * ldi, count) : Vec(T(0));
        at::vec::fmadd(av, acc[r][v], base).store(out + r * ldo, count);
      } else {
        const Vec base = init ? Vec::loadu(init + r * ldi + v * W) : Vec(T(0));
        at::vec::fmadd(av, acc[r][v], base).store(out + r * ldo + v * W);
      }
    }
  }
}

// Asks for rows [0, MR) x columns [j, j + width) of `pf` (row stride ldp) to be brought into L2.
template <typename T, int MR>
inline void prefetch_to_l2(const T* pf, int64_t ldp, int64_t j, int64_t width) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int r = 0; r < MR; ++r)
    for (int64_t c = j; c < j + width; c += kLine) __builtin_prefetch(pf + r * ldp + c, 0, 2);
}

template <typename T, int MR>
inline void expand_row_group(const T* coef, int64_t ldc, const T* basis, int64_t ldb, int64_t n, int64_t cols, T alpha,
                             const T* init, int64_t ldi, T* out, int64_t ldo, const T* pf, int64_t ldp) {
  constexpr int64_t W = vec_size<T>();
  int64_t j = 0;
  for (; j + 4 * W <= cols; j += 4 * W) {
    if (pf) prefetch_to_l2<T, MR>(pf, ldp, j, 4 * W);
    expand_tile<T, MR, 4, false>(coef, ldc, basis + j, ldb, n, alpha, init ? init + j : nullptr, ldi, out + j, ldo, W);
  }
  if (pf && j < cols) prefetch_to_l2<T, MR>(pf, ldp, j, cols - j);
  for (; j + W <= cols; j += W)
    expand_tile<T, MR, 1, false>(coef, ldc, basis + j, ldb, n, alpha, init ? init + j : nullptr, ldi, out + j, ldo, W);
  if (j < cols)
    expand_tile<T, MR, 1, true>(coef, ldc, basis + j, ldb, n, alpha, init ? init + j : nullptr, ldi, out + j, ldo,
                                cols - j);
}

// out[i, j] = init[i, j] + alpha * sum_k coef[i, k] * basis[k, j] for i < m, j < cols (init may be nullptr
// for 0, or alias out). coef [m, n] (row stride ldc), basis [n, cols] (row stride ldb).
// prefetch (or nullptr): an [m, cols] block (row stride ldp) that the caller reads next: it is pulled into
// L2 a few lines per tile while this runs, instead of by demand misses later (a later column-sliced walk
// over a cold block is latency-bound: each row is its own page, too many streams for the hardware prefetcher).
template <typename T>
void expand_rows(const T* coef, int64_t ldc, int64_t m, const T* basis, int64_t ldb, int64_t n, int64_t cols, T alpha,
                 const T* init, int64_t ldi, T* out, int64_t ldo, const T* prefetch = nullptr, int64_t ldp = 0) {
  constexpr int MR = 4;
  int64_t i = 0;
  for (; i + MR <= m; i += MR)
    expand_row_group<T, MR>(coef + i * ldc, ldc, basis, ldb, n, cols, alpha, init ? init + i * ldi : nullptr, ldi,
                            out + i * ldo, ldo, prefetch ? prefetch + i * ldp : nullptr, ldp);
  for (; i < m; ++i)
    expand_row_group<T, 1>(coef + i * ldc, ldc, basis, ldb, n, cols, alpha, init ? init + i * ldi : nullptr, ldi,
                           out + i * ldo, ldo, prefetch ? prefetch + i * ldp : nullptr, ldp);
}

// ---------------------------------------------------------------------------------------------
// accumulate_outer: a tile of MK output rows (ranks) x NV vectors of columns stays in registers while the
// m rows stream by; per row, NV loads of rows[i] and MK broadcasts of coef[i, k].
// ---------------------------------------------------------------------------------------------
template <typename T, int MK, int NV, bool PARTIAL>
inline void outer_tile(const T* coef, int64_t ldc, const T* rows, int64_t ldr, int64_t m, T* D, int64_t ldd,
                       int64_t count) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc[MK][NV];
  for (int k = 0; k < MK; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = PARTIAL ? Vec::loadu(D + k * ldd, count) : Vec::loadu(D + k * ldd + v * W);
  gemm_tile<T, MK, NV, PARTIAL>(coef, 1, ldc, rows, ldr, m, count, acc);  // A(k, i) = coef[i, k]
  for (int k = 0; k < MK; ++k)
    for (int v = 0; v < NV; ++v) {
      if (PARTIAL) acc[k][v].store(D + k * ldd, count); else acc[k][v].store(D + k * ldd + v * W);
    }
}

// 8 ranks x 3 vectors: 24 accumulators, 11 loads per 24 FMAs (8x2, 6x4 and 4x4 measured the same or slower).
constexpr int kOuterRanks = 8;
constexpr int kOuterVectors = 3;

// Every rank for one column slice of rows: the [m, slice] panel is read from L2 once and then from L1 by each
// group of ranks (ranks outer, slices inner, measured ~5% slower).
template <typename T, int NV, bool PARTIAL>
inline void outer_column_slice(const T* coef, int64_t ldc, const T* rows, int64_t ldr, int64_t m, int64_t n, T* D,
                               int64_t ldd, int64_t count) {
  int64_t k = 0;
  for (; k + kOuterRanks <= n; k += kOuterRanks)
    outer_tile<T, kOuterRanks, NV, PARTIAL>(coef + k, ldc, rows, ldr, m, D + k * ldd, ldd, count);
  if (k + 4 <= n) {
    outer_tile<T, 4, NV, PARTIAL>(coef + k, ldc, rows, ldr, m, D + k * ldd, ldd, count);
    k += 4;
  }
  if (k + 2 <= n) {
    outer_tile<T, 2, NV, PARTIAL>(coef + k, ldc, rows, ldr, m, D + k * ldd, ldd, count);
    k += 2;
  }
  if (k < n) outer_tile<T, 1, NV, PARTIAL>(coef + k, ldc, rows, ldr, m, D + k * ldd, ldd, count);
}

// D[k, j] += sum_i coef[i, k] * rows[i, j] for k < n, j < cols, i < m. coef [m, n] (row stride ldc), rows
// [m, cols] (row stride ldr), D [n, cols] (row stride ldd). Keep m * slice width in L1 (m <= ~128).
template <typename T>
void accumulate_outer(const T* coef, int64_t ldc, const T* rows, int64_t ldr, int64_t m, int64_t n, int64_t cols, T* D,
                      int64_t ldd) {
  constexpr int64_t W = vec_size<T>();
  constexpr int NV = kOuterVectors;
  int64_t j = 0;
  for (; j + NV * W <= cols; j += NV * W)
    outer_column_slice<T, NV, false>(coef, ldc, rows + j, ldr, m, n, D + j, ldd, W);
  for (; j + W <= cols; j += W) outer_column_slice<T, 1, false>(coef, ldc, rows + j, ldr, m, n, D + j, ldd, W);
  if (j < cols) outer_column_slice<T, 1, true>(coef, ldc, rows + j, ldr, m, n, D + j, ldd, cols - j);
}

}  // namespace low_rank
}  // namespace fastft
