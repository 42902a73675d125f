// Batched fp32 GEMM for SVE (issue 19): C[g] = A[g] @ B[g] for row-major A [G, M, K], B [G, K, N], C [G, M, N].
// ACLE intrinsics (<arm_sve.h>), vector-length agnostic: a column strip is two vectors of svcntw() lanes (16 on
// A64FX's 512-bit SVE), its tail masked by svwhilelt, so any N and any vector length are handled; a tile is 4
// rows x 2 vectors of accumulators (8 z registers), each step one broadcast element of A times one row of B
// (fmla). Single-threaded: XLA runs it as one custom call per bucket.
//
// Exposed two ways: the XLA FFI handler JpllmSveBatchedGemm (jax.ffi.register_ffi_target, api_version 1) and the
// plain C function jpllm_sve_bgemm (ctypes tests without JAX).
#include <arm_sve.h>

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows i..i+3 of C, columns j..j+2*vl (masked by p0, p1).
inline void Tile4(const float* a, int64_t k, const float* b, int64_t n, float* c, svbool_t p0, svbool_t p1,
                  int64_t vl) {
  svfloat32_t c00 = svdup_n_f32(0.f), c01 = svdup_n_f32(0.f), c10 = svdup_n_f32(0.f), c11 = svdup_n_f32(0.f);
  svfloat32_t c20 = svdup_n_f32(0.f), c21 = svdup_n_f32(0.f), c30 = svdup_n_f32(0.f), c31 = svdup_n_f32(0.f);
  const float *a0 = a, *a1 = a + k, *a2 = a + 2 * k, *a3 = a + 3 * k;
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * n;
    const svfloat32_t b0 = svld1_f32(p0, bp), b1 = svld1_f32(p1, bp + vl);
    c00 = svmla_n_f32_x(p0, c00, b0, a0[p]);
    c01 = svmla_n_f32_x(p1, c01, b1, a0[p]);
    c10 = svmla_n_f32_x(p0, c10, b0, a1[p]);
    c11 = svmla_n_f32_x(p1, c11, b1, a1[p]);
    c20 = svmla_n_f32_x(p0, c20, b0, a2[p]);
    c21 = svmla_n_f32_x(p1, c21, b1, a2[p]);
    c30 = svmla_n_f32_x(p0, c30, b0, a3[p]);
    c31 = svmla_n_f32_x(p1, c31, b1, a3[p]);
  }
  svst1_f32(p0, c, c00);
  svst1_f32(p1, c + vl, c01);
  svst1_f32(p0, c + n, c10);
  svst1_f32(p1, c + n + vl, c11);
  svst1_f32(p0, c + 2 * n, c20);
  svst1_f32(p1, c + 2 * n + vl, c21);
  svst1_f32(p0, c + 3 * n, c30);
  svst1_f32(p1, c + 3 * n + vl, c31);
}

// One row of C, columns j..j+2*vl: the rows left over after the 4-row tiles.
inline void Tile1(const float* a, int64_t k, const float* b, int64_t n, float* c, svbool_t p0, svbool_t p1,
                  int64_t vl) {
  svfloat32_t c0 = svdup_n_f32(0.f), c1 = svdup_n_f32(0.f);
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * n;
    c0 = svmla_n_f32_x(p0, c0, svld1_f32(p0, bp), a[p]);
    c1 = svmla_n_f32_x(p1, c1, svld1_f32(p1, bp + vl), a[p]);
  }
  svst1_f32(p0, c, c0);
  svst1_f32(p1, c + vl, c1);
}

}  // namespace

extern "C" void jpllm_sve_bgemm(const float* a, const float* b, float* c, int64_t g, int64_t m, int64_t k,
                                int64_t n) {
  const int64_t vl = static_cast<int64_t>(svcntw());
  for (int64_t i = 0; i < g; ++i) {
    const float* ai = a + i * m * k;
    const float* bi = b + i * k * n;
    float* ci = c + i * m * n;
    for (int64_t j = 0; j < n; j += 2 * vl) {
      const svbool_t p0 = svwhilelt_b32_s64(j, n), p1 = svwhilelt_b32_s64(j + vl, n);
      int64_t r = 0;
      for (; r + 4 <= m; r += 4) Tile4(ai + r * k, k, bi + j, n, ci + r * n + j, p0, p1, vl);
      for (; r < m; ++r) Tile1(ai + r * k, k, bi + j, n, ci + r * n + j, p0, p1, vl);
    }
  }
}

// The SVE vector length in fp32 lanes of the calling thread (16 on A64FX).
extern "C" int64_t jpllm_sve_fp32_lanes() { return static_cast<int64_t>(svcntw()); }

namespace {

ffi::Error BatchedGemm(ffi::BufferR3<ffi::F32> a, ffi::BufferR3<ffi::F32> b, ffi::ResultBufferR3<ffi::F32> c) {
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (db[0] != da[0] || db[1] != da[2] || dc[0] != da[0] || dc[1] != da[1] || dc[2] != db[2]) {
    return ffi::Error::InvalidArgument("jpllm_sve_bgemm: want A [G, M, K], B [G, K, N], C [G, M, N]");
  }
  jpllm_sve_bgemm(a.typed_data(), b.typed_data(), c->typed_data(), da[0], da[1], da[2], db[2]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpllmSveBatchedGemm, BatchedGemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Ret<ffi::BufferR3<ffi::F32>>());
