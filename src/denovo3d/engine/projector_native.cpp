// Fused trilinear rotation of full centred Fourier volumes: the CPU kernel behind
// denovo3d.engine.projector.rotate (and its adjoint, splat, and the E-step's fine pass,
// fine_scores, below), compiled at first use by denovo3d.engine.native.
//
// One loop per orientation and block of voxels: the rotated frequency, its cell in the cube
// around the centre (base clamped to [0, 2r-1] like the torch path), the eight corners and
// three lerps, stored straight into the output. The cube of one class (~2 MB at box 64) stays
// in cache; no (O, V, 3) temporaries.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>  // AVX2 intrinsics, used only in functions built for AVX2
#endif

// x86-64 with GCC or clang: an AVX2 + FMA build of the loop besides the baseline (SSE2) one
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define D3D_X86 1
#else
#define D3D_X86 0
#endif

// inlined into its caller and compiled for the caller's instruction set
#if defined(__GNUC__) || defined(__clang__)
#define D3D_INLINE inline __attribute__((always_inline))
#else
#define D3D_INLINE inline
#endif

namespace {

constexpr int64_t kBlock = 256;  // voxels whose cells are found in one vectorisable pass

// Cells of a block of voxels: p = k A + r, base = clamp(trunc(p), 0, 2r-1), weights p - trunc(p)
// (the torch path's torch.frac), flat index (z, y, x) into the cube of side 2r+1.
template <typename T>
D3D_INLINE void cells(const T* k, int64_t stride, int64_t n, const T* R, T shift, int32_t top,
                      int32_t side, int32_t* idx, T* wx, T* wy, T* wz, int32_t* base_z = nullptr) {
  const T m00 = R[0], m01 = R[1], m02 = R[2];
  const T m10 = R[3], m11 = R[4], m12 = R[5];
  const T m20 = R[6], m21 = R[7], m22 = R[8];
  for (int64_t j = 0; j < n; ++j) {
    const T kx = k[j], ky = k[stride + j], kz = k[2 * stride + j];
    const T px = kx * m00 + ky * m10 + kz * m20 + shift;
    const T py = kx * m01 + ky * m11 + kz * m21 + shift;
    const T pz = kx * m02 + ky * m12 + kz * m22 + shift;
    // rounding toward zero through int32: |p| is a few times r, far below 2^31
    const int32_t tx = static_cast<int32_t>(px), ty = static_cast<int32_t>(py),
                  tz = static_cast<int32_t>(pz);
    wx[j] = px - static_cast<T>(tx);
    wy[j] = py - static_cast<T>(ty);
    wz[j] = pz - static_cast<T>(tz);
    const int32_t bx = std::min(std::max(tx, 0), top), by = std::min(std::max(ty, 0), top),
                  bz = std::min(std::max(tz, 0), top);
    idx[j] = (bz * side + by) * side + bx;
    if (base_z != nullptr) base_z[j] = bz;
  }
}

// One sample: c000 points at the cell's corner (x, y, z) of an interleaved complex cube.
template <typename T>
D3D_INLINE void sample(const T* c000, int64_t sy, int64_t sz, T wx, T wy, T wz, T* dst) {
  for (int i = 0; i < 2; ++i) {
    const T* c = c000 + i;
    const T a0 = c[0] + wy * (c[sy] - c[0]);                     // x, z
    const T a1 = c[2] + wy * (c[sy + 2] - c[2]);                 // x+1, z
    const T b0 = c[sz] + wy * (c[sz + sy] - c[sz]);              // x, z+1
    const T b1 = c[sz + 2] + wy * (c[sz + sy + 2] - c[sz + 2]);  // x+1, z+1
    const T e0 = a0 + wz * (b0 - a0), e1 = a1 + wz * (b1 - a1);
    dst[i] = e0 + wx * (e1 - e0);
  }
}

#if defined(__SSE2__)
// float: the corners x and x+1 of a row are one 128-bit load (re, im, re, im); lerp along y
// and z on the pairs, then along x.
template <>
D3D_INLINE void sample<float>(const float* c000, int64_t sy, int64_t sz, float wx, float wy,
                              float wz, float* dst) {
  const __m128 vy = _mm_set1_ps(wy), vz = _mm_set1_ps(wz), vx = _mm_set1_ps(wx);
  const __m128 q00 = _mm_loadu_ps(c000), q01 = _mm_loadu_ps(c000 + sy);
  const __m128 q10 = _mm_loadu_ps(c000 + sz), q11 = _mm_loadu_ps(c000 + sz + sy);
  const __m128 a = _mm_add_ps(q00, _mm_mul_ps(vy, _mm_sub_ps(q01, q00)));
  const __m128 b = _mm_add_ps(q10, _mm_mul_ps(vy, _mm_sub_ps(q11, q10)));
  const __m128 e = _mm_add_ps(a, _mm_mul_ps(vz, _mm_sub_ps(b, a)));
  const __m128 h = _mm_movehl_ps(e, e);
  const __m128 s = _mm_add_ps(e, _mm_mul_ps(vx, _mm_sub_ps(h, e)));
  _mm_storel_pi(reinterpret_cast<__m64*>(dst), s);
}
#endif

// Whether to run the AVX2 + FMA build of a float loop: asked for (simd) and the processor has it.
template <typename T>
bool use_avx2(bool simd) {
#if D3D_X86
  return simd && std::is_same_v<T, float> && __builtin_cpu_supports("avx2")
         && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The problem, in elements of T (complex numbers interleaved re, im).
template <typename T>
struct Problem {
  const T* cube;  // (K, side^3, 2)
  const T* rot;   // (O, 3, 3)
  const T* k;     // (3, V)
  T* out;         // (K, O, V, 2) with strides out_sk, out_so
  int64_t K, n_cube, V, out_sk, out_so, side;
  T shift;  // r: the cube's centre
};

// Orientations [o0, o1): per block of voxels the cells once, then the samples of every class.
template <typename T>
D3D_INLINE void rotate_range(const Problem<T>& p, int64_t o0, int64_t o1) {
  int32_t idx[kBlock];
  T wx[kBlock], wy[kBlock], wz[kBlock];
  const int32_t top = static_cast<int32_t>(p.side - 2), side = static_cast<int32_t>(p.side);
  const int64_t sy = 2 * p.side, sz = 2 * p.side * p.side;
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t v0 = 0; v0 < p.V; v0 += kBlock) {
      const int64_t n = std::min(kBlock, p.V - v0);
      cells<T>(p.k + v0, p.V, n, p.rot + 9 * o, p.shift, top, side, idx, wx, wy, wz);
      for (int64_t c = 0; c < p.K; ++c) {
        const T* cube = p.cube + 2 * c * p.n_cube;
        T* row = p.out + c * p.out_sk + o * p.out_so + 2 * v0;
        for (int64_t j = 0; j < n; ++j) {
          sample<T>(cube + 2 * static_cast<int64_t>(idx[j]), sy, sz, wx[j], wy[j], wz[j],
                    row + 2 * j);
        }
      }
    }
  }
}

#if D3D_X86
// Two samples at once (j and j + 1, one per 128-bit lane), the same lerps as sample<float>
// (fused as the AVX2 build of that one compiles them): corners x and x+1 of a row one 128-bit
// load per sample, the weights each one 64-bit load spread over its lane.
__attribute__((target("avx2,fma"))) D3D_INLINE __m256 pair(const float* lo, const float* hi) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo)), _mm_loadu_ps(hi), 1);
}

// (w[0] x4, w[1] x4)
__attribute__((target("avx2,fma"))) D3D_INLINE __m256 weight(const float* w) {
  const __m256 two = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(w)));
  return _mm256_permutevar_ps(two, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

__attribute__((target("avx2,fma"))) D3D_INLINE void sample2(const float* a, const float* b,
                                                            int64_t sy, int64_t sz,
                                                            const float* wx, const float* wy,
                                                            const float* wz, float* dst) {
  const __m256 vy = weight(wy), vz = weight(wz), vx = weight(wx);
  const __m256 q00 = pair(a, b), q01 = pair(a + sy, b + sy);
  const __m256 q10 = pair(a + sz, b + sz), q11 = pair(a + sz + sy, b + sz + sy);
  const __m256 ya = _mm256_fmadd_ps(vy, _mm256_sub_ps(q01, q00), q00);
  const __m256 yb = _mm256_fmadd_ps(vy, _mm256_sub_ps(q11, q10), q10);
  const __m256 e = _mm256_fmadd_ps(vz, _mm256_sub_ps(yb, ya), ya);
  const __m256 h = _mm256_permute_ps(e, 0x4E);
  const __m256 v = _mm256_fmadd_ps(vx, _mm256_sub_ps(h, e), e);
  const __m256d both = _mm256_permute4x64_pd(_mm256_castps_pd(v), 0x08);
  _mm_storeu_ps(dst, _mm256_castps256_ps128(_mm256_castpd_ps(both)));
}

// The y and z lerps of samples j, j + 1 (one per 128-bit lane): (corner x, corner x + 1) of each.
__attribute__((target("avx2,fma"))) D3D_INLINE __m256 lerp_yz(const float* a, const float* b,
                                                              int64_t sy, int64_t sz,
                                                              const float* wy, const float* wz) {
  const __m256 vy = weight(wy), vz = weight(wz);
  const __m256 q00 = pair(a, b), q01 = pair(a + sy, b + sy);
  const __m256 q10 = pair(a + sz, b + sz), q11 = pair(a + sz + sy, b + sz + sy);
  const __m256 ya = _mm256_fmadd_ps(vy, _mm256_sub_ps(q01, q00), q00);
  const __m256 yb = _mm256_fmadd_ps(vy, _mm256_sub_ps(q11, q10), q10);
  return _mm256_fmadd_ps(vz, _mm256_sub_ps(yb, ya), ya);
}

// Four samples j .. j + 3 (cells at a, b, c, d): sample2's lerps, the x lerps of all four in
// one 256-bit op and one store.
__attribute__((target("avx2,fma"))) D3D_INLINE void sample4(const float* a, const float* b,
                                                            const float* c, const float* d,
                                                            int64_t sy, int64_t sz,
                                                            const float* wx, const float* wy,
                                                            const float* wz, float* dst) {
  const __m256 e1 = lerp_yz(a, b, sy, sz, wy, wz), e2 = lerp_yz(c, d, sy, sz, wy + 2, wz + 2);
  const __m256 x0 = _mm256_shuffle_ps(e1, e2, 0x44), x1 = _mm256_shuffle_ps(e1, e2, 0xEE);
  const __m256 vx = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(wx)),
                                             _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3));
  const __m256 v = _mm256_fmadd_ps(vx, _mm256_sub_ps(x1, x0), x0);  // (j, j+2 | j+1, j+3)
  _mm256_storeu_ps(dst, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8)));
}

// One axis a of cells_avx2: p = kx m_0a + ky m_1a + kz m_2a + r, fused as GCC contracts
// cells<float> (kx m_0a onto ky m_1a, then kz m_2a), the weight p - trunc(p) into w; returns the
// base clamp(trunc(p), 0, top).
__attribute__((target("avx2,fma"))) D3D_INLINE __m256i cell_axis(__m256 kx, __m256 ky, __m256 kz,
                                                                 __m256 m0, __m256 m1, __m256 m2,
                                                                 __m256 shift, __m256i zero,
                                                                 __m256i top, float* w) {
  const __m256 q = _mm256_fmadd_ps(kz, m2, _mm256_fmadd_ps(kx, m0, _mm256_mul_ps(ky, m1)));
  const __m256 p = _mm256_add_ps(q, shift);
  const __m256i t = _mm256_cvttps_epi32(p);
  _mm256_storeu_ps(w, _mm256_sub_ps(p, _mm256_cvtepi32_ps(t)));
  return _mm256_min_epi32(_mm256_max_epi32(t, zero), top);
}

// cells<float> eight voxels at a time, written out: GCC's vectorisation of its clamps
// (std::min/max, as compares and blends) took 64 instructions per eight voxels, this 48; the
// same cells and weights as GCC's AVX2 build of cells<float>, bit for bit.
__attribute__((target("avx2,fma"))) D3D_INLINE void cells_avx2(
    const float* k, int64_t stride, int64_t n, const float* R, float shift, int32_t top,
    int32_t side, int32_t* idx, float* wx, float* wy, float* wz) {
  const __m256 vs = _mm256_set1_ps(shift);
  const __m256i zero = _mm256_setzero_si256(), vtop = _mm256_set1_epi32(top),
                vside = _mm256_set1_epi32(side);
  __m256 m[9];
  for (int i = 0; i < 9; ++i) m[i] = _mm256_set1_ps(R[i]);
  int64_t j = 0;
  for (; j + 7 < n; j += 8) {
    const __m256 kx = _mm256_loadu_ps(k + j), ky = _mm256_loadu_ps(k + stride + j),
                 kz = _mm256_loadu_ps(k + 2 * stride + j);
    const __m256i bx = cell_axis(kx, ky, kz, m[0], m[3], m[6], vs, zero, vtop, wx + j);
    const __m256i by = cell_axis(kx, ky, kz, m[1], m[4], m[7], vs, zero, vtop, wy + j);
    const __m256i bz = cell_axis(kx, ky, kz, m[2], m[5], m[8], vs, zero, vtop, wz + j);
    const __m256i zy = _mm256_add_epi32(_mm256_mullo_epi32(bz, vside), by);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j),
                        _mm256_add_epi32(_mm256_mullo_epi32(zy, vside), bx));
  }
  if (j < n) {
    cells<float>(k + j, stride, n - j, R, shift, top, side, idx + j, wx + j, wy + j, wz + j);
  }
}

// The loop of rotate_range for float, compiled for AVX2 + FMA (8-wide cells, fused lerps, two
// samples at a time), chosen at run time.
__attribute__((target("avx2,fma"))) void rotate_range_avx2(const Problem<float>& p, int64_t o0,
                                                           int64_t o1) {
  int32_t idx[kBlock];
  float wx[kBlock], wy[kBlock], wz[kBlock];
  const int32_t top = static_cast<int32_t>(p.side - 2), side = static_cast<int32_t>(p.side);
  const int64_t sy = 2 * p.side, sz = 2 * p.side * p.side;
  // a block of voxels for eight orientations in turn: consecutive ones (a coarse orientation's
  // fine children) sample nearby cells, still in cache (6% faster at box 64)
  for (int64_t g0 = o0; g0 < o1; g0 += 8) {
    for (int64_t v0 = 0; v0 < p.V; v0 += kBlock) {
      for (int64_t o = g0; o < std::min(g0 + 8, o1); ++o) {
        const int64_t n = std::min(kBlock, p.V - v0);
        cells_avx2(p.k + v0, p.V, n, p.rot + 9 * o, p.shift, top, side, idx, wx, wy, wz);
        for (int64_t c = 0; c < p.K; ++c) {
          const float* cube = p.cube + 2 * c * p.n_cube;
          float* row = p.out + c * p.out_sk + o * p.out_so + 2 * v0;
          int64_t j = 0;
          for (; j + 3 < n; j += 4) {
            sample4(cube + 2 * static_cast<int64_t>(idx[j]),
                    cube + 2 * static_cast<int64_t>(idx[j + 1]),
                    cube + 2 * static_cast<int64_t>(idx[j + 2]),
                    cube + 2 * static_cast<int64_t>(idx[j + 3]), sy, sz, wx + j, wy + j, wz + j,
                    row + 2 * j);
          }
          for (; j + 1 < n; j += 2) {
            sample2(cube + 2 * static_cast<int64_t>(idx[j]),
                    cube + 2 * static_cast<int64_t>(idx[j + 1]), sy, sz, wx + j, wy + j, wz + j,
                    row + 2 * j);
          }
          if (j < n) {
            sample<float>(cube + 2 * static_cast<int64_t>(idx[j]), sy, sz, wx[j], wy[j], wz[j],
                          row + 2 * j);
          }
        }
      }
    }
  }
}
#endif

template <typename T>
void rotate_impl(const at::Tensor& table, const at::Tensor& rotations, const at::Tensor& coords,
                 int64_t r, const at::Tensor& out, bool simd) {
  const at::Tensor k_t = coords.t().contiguous();  // (3, V): unit-stride loads for the cells
  Problem<T> p{table.const_data_ptr<T>(), rotations.const_data_ptr<T>(),
               k_t.const_data_ptr<T>(),   out.mutable_data_ptr<T>(),
               table.size(0),             table.size(1),
               coords.size(0),            out.stride(0),
               out.stride(1),             2 * r + 1,
               static_cast<T>(r)};
  const bool avx2 = use_avx2<T>(simd);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(p.V * p.K, 1));
  at::parallel_for(0, rotations.size(0), grain, [&](int64_t o0, int64_t o1) {
#if D3D_X86
    if constexpr (std::is_same_v<T, float>) {
      if (avx2) {
        rotate_range_avx2(p, o0, o1);
        return;
      }
    }
#endif
    rotate_range<T>(p, o0, o1);
  });
}

// ---- splat: the adjoint, for the M-step's back-projection ----

// Spreads one sample v = (re, im, weight, 0) over its cell's corners (the lerps' adjoint) into
// acc (side^3, 4): corner (x, y, z) at c000, x+1 next to it; only the corners of the plane z
// (lower) and z+1 (upper) that are asked for.
template <typename T>
D3D_INLINE void spread(T* c000, int64_t sy, int64_t sz, T wx, T wy, T wz, const T* v, bool lower,
                       bool upper) {
  for (int i = 0; i < 3; ++i) {
    const T z1 = v[i] * wz, z0 = v[i] - z1;
    const T y01 = z0 * wy, y00 = z0 - y01, y11 = z1 * wy, y10 = z1 - y11;
    const T rows[4] = {y00, y01, y10, y11};
    const int64_t off[4] = {0, sy, sz, sz + sy};
    for (int q = lower ? 0 : 2; q < (upper ? 4 : 2); ++q) {
      const T x1 = rows[q] * wx;
      c000[off[q] + i] += rows[q] - x1;
      c000[off[q] + 4 + i] += x1;
    }
  }
}

#if defined(__SSE2__)
template <>
D3D_INLINE void spread<float>(float* c000, int64_t sy, int64_t sz, float wx, float wy, float wz,
                              const float* v, bool lower, bool upper) {
  const __m128 s = _mm_loadu_ps(v), vy = _mm_set1_ps(wy), vx = _mm_set1_ps(wx);
  const __m128 z1 = _mm_mul_ps(s, _mm_set1_ps(wz)), z0 = _mm_sub_ps(s, z1);
  const __m128 y01 = _mm_mul_ps(z0, vy), y11 = _mm_mul_ps(z1, vy);
  const __m128 rows[4] = {_mm_sub_ps(z0, y01), y01, _mm_sub_ps(z1, y11), y11};
  float* dst[4] = {c000, c000 + sy, c000 + sz, c000 + sz + sy};
  for (int q = lower ? 0 : 2; q < (upper ? 4 : 2); ++q) {
    const __m128 x1 = _mm_mul_ps(rows[q], vx), x0 = _mm_sub_ps(rows[q], x1);
    _mm_storeu_ps(dst[q], _mm_add_ps(_mm_loadu_ps(dst[q]), x0));
    _mm_storeu_ps(dst[q] + 4, _mm_add_ps(_mm_loadu_ps(dst[q] + 4), x1));
  }
}
#endif

template <typename T>
struct Scatter {
  const T* values;   // (O, V, 2) with row stride values_so
  const T* weights;  // (O, V) with row stride weights_so
  const T* rot;      // (O, 3, 3)
  const T* k;        // (3, V)
  int64_t O, V, values_so, weights_so, side;
  T shift;
};

// Every sample added into acc (side^3, 4) interleaved (re, im, weight, 0), the planes
// [z0, z1) of the cube only: each plane's sums in the same order whatever the slabs, so the
// result does not depend on the number of threads.
template <typename T>
D3D_INLINE void splat_slab(const Scatter<T>& p, T* acc, int32_t z0, int32_t z1) {
  int32_t idx[kBlock], base_z[kBlock];
  T wx[kBlock], wy[kBlock], wz[kBlock];
  const int32_t top = static_cast<int32_t>(p.side - 2), side = static_cast<int32_t>(p.side);
  const int64_t sy = 4 * p.side, sz = 4 * p.side * p.side;
  for (int64_t o = 0; o < p.O; ++o) {
    const T* val = p.values + o * p.values_so;
    const T* wgt = p.weights + o * p.weights_so;
    for (int64_t v0 = 0; v0 < p.V; v0 += kBlock) {
      const int64_t n = std::min(kBlock, p.V - v0);
      cells<T>(p.k + v0, p.V, n, p.rot + 9 * o, p.shift, top, side, idx, wx, wy, wz, base_z);
      for (int64_t j = 0; j < n; ++j) {
        const bool lower = base_z[j] >= z0 && base_z[j] < z1;
        const bool upper = base_z[j] + 1 >= z0 && base_z[j] + 1 < z1;
        if (!lower && !upper) continue;
        const T v[4] = {val[2 * (v0 + j)], val[2 * (v0 + j) + 1], wgt[v0 + j], T(0)};
        spread<T>(acc + 4 * static_cast<int64_t>(idx[j]), sy, sz, wx[j], wy[j], wz[j], v, lower,
                  upper);
      }
    }
  }
}

#if D3D_X86
__attribute__((target("avx2,fma"))) void splat_slab_avx2(const Scatter<float>& p, float* acc,
                                                         int32_t z0, int32_t z1) {
  splat_slab<float>(p, acc, z0, z1);
}
#endif

template <typename T>
void splat_impl(const at::Tensor& values, const at::Tensor& weights, const at::Tensor& rotations,
                const at::Tensor& coords, int64_t r, const at::Tensor& acc, bool simd) {
  const at::Tensor k_t = coords.t().contiguous();
  const int64_t side = 2 * r + 1, n_cube = side * side * side;
  Scatter<T> p{values.const_data_ptr<T>(),
               weights.const_data_ptr<T>(),
               rotations.const_data_ptr<T>(),
               k_t.const_data_ptr<T>(),
               rotations.size(0),
               coords.size(0),
               values.stride(0),
               weights.stride(0),
               side,
               static_cast<T>(r)};
  const bool avx2 = use_avx2<T>(simd);
  // one slab of z planes per thread, each with about the same share of the sphere's samples
  // (plane z holds ~ r^2 - (z - r)^2 of them); a thread finds every sample's cell but adds only
  // the corners in its slab, so no two threads write the same element
  const int64_t n_slabs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), side));
  std::vector<double> cum(side + 1, 0.0);
  for (int64_t z = 0; z < side; ++z) {
    cum[z + 1] = cum[z] + 1.0 + std::max<double>(0.0, double(r * r - (z - r) * (z - r)));
  }
  std::vector<int32_t> bounds(n_slabs + 1, 0);
  for (int64_t t = 1; t < n_slabs; ++t) {
    const double goal = cum[side] * double(t) / double(n_slabs);
    bounds[t] = static_cast<int32_t>(std::lower_bound(cum.begin(), cum.end(), goal) - cum.begin());
  }
  bounds[n_slabs] = static_cast<int32_t>(side);
  at::Tensor cube = values.new_zeros({n_cube, 4});
  T* buf = cube.mutable_data_ptr<T>();
  at::parallel_for(0, n_slabs, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
#if D3D_X86
      if constexpr (std::is_same_v<T, float>) {
        if (avx2) {
          splat_slab_avx2(p, buf, bounds[t], bounds[t + 1]);
          continue;
        }
      }
#endif
      splat_slab<T>(p, buf, bounds[t], bounds[t + 1]);
    }
  });
  T* dst = acc.mutable_data_ptr<T>();
  at::parallel_for(0, n_cube, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int c = 0; c < 3; ++c) dst[c * n_cube + i] += buf[i * 4 + c];
    }
  });
}

// values (O, V, 2) (a real view of complex samples) and weights (O, V), each with the voxels
// contiguous, rotations (O, 3, 3), coords (V, 3) -> added into acc (3, (2r+1)^3): the adjoint of
// rotate on the cube, channels re, im, weight.
void splat(const at::Tensor& values, const at::Tensor& weights, const at::Tensor& rotations,
           const at::Tensor& coords, int64_t r, const at::Tensor& acc, bool simd) {
  TORCH_CHECK(r >= 1 && 2 * r + 1 <= 1290, "radius 1 <= r, side 2r+1 <= 1290 (int32 index)");
  const int64_t side = 2 * r + 1, O = rotations.size(0), V = coords.size(0);
  TORCH_CHECK(rotations.dim() == 3 && rotations.size(1) == 3 && rotations.size(2) == 3
                  && rotations.is_contiguous(), "rotations (O, 3, 3) contiguous");
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3 && coords.is_contiguous(),
              "coords (V, 3) contiguous");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == O && values.size(1) == V
                  && values.size(2) == 2 && values.stride(2) == 1 && values.stride(1) == 2,
              "values (O, V, 2) with the voxels contiguous");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == O && weights.size(1) == V
                  && weights.stride(1) == 1, "weights (O, V) with the voxels contiguous");
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == 3 && acc.size(1) == side * side * side
                  && acc.is_contiguous(), "acc (3, (2r+1)^3) contiguous");
  const auto dtype = acc.scalar_type();
  TORCH_CHECK(values.scalar_type() == dtype && weights.scalar_type() == dtype
                  && rotations.scalar_type() == dtype && coords.scalar_type() == dtype,
              "one dtype for all arguments");
  if (dtype == at::kFloat) {
    splat_impl<float>(values, weights, rotations, coords, r, acc, simd);
  } else {
    TORCH_CHECK(dtype == at::kDouble, "float32 or float64");
    splat_impl<double>(values, weights, rotations, coords, r, acc, simd);
  }
}

// table (K, (2r+1)^3, 2), rotations (O, 3, 3), coords (V, 3), out (K, O, V, 2): real views of
// the complex cube and samples, one dtype (float32 or float64), all on the CPU; simd = false
// keeps to the baseline build (for tests of both).
void rotate(const at::Tensor& table, const at::Tensor& rotations, const at::Tensor& coords,
            int64_t r, const at::Tensor& out, bool simd) {
  TORCH_CHECK(r >= 1 && 2 * r + 1 <= 1290, "radius 1 <= r, side 2r+1 <= 1290 (int32 index)");
  const int64_t side = 2 * r + 1;
  TORCH_CHECK(table.dim() == 3 && table.size(1) == side * side * side && table.size(2) == 2
                  && table.is_contiguous(), "table (K, (2r+1)^3, 2) contiguous");
  TORCH_CHECK(rotations.dim() == 3 && rotations.size(1) == 3 && rotations.size(2) == 3
                  && rotations.is_contiguous(), "rotations (O, 3, 3) contiguous");
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3 && coords.is_contiguous(),
              "coords (V, 3) contiguous");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == table.size(0) && out.size(1) == rotations.size(0)
                  && out.size(2) == coords.size(0) && out.size(3) == 2 && out.stride(3) == 1
                  && out.stride(2) == 2, "out (K, O, V, 2) with the voxels contiguous");
  const auto dtype = table.scalar_type();
  TORCH_CHECK(rotations.scalar_type() == dtype && coords.scalar_type() == dtype
                  && out.scalar_type() == dtype, "one dtype for all arguments");
  if (dtype == at::kFloat) {
    rotate_impl<float>(table, rotations, coords, r, out, simd);
  } else {
    TORCH_CHECK(dtype == at::kDouble, "float32 or float64");
    rotate_impl<double>(table, rotations, coords, r, out, simd);
  }
}


// ---- fine_scores: the E-step's fine pass (cross terms and norms) ----
//
// For each particle of a chunk (in parallel): block after block of voxels, its data rows
// D/s2·e(t_j)·e(d_c) (its coarse offsets j, the eight children's steps c) built in cache, times
// the projections of its parents' eight children (the columns), and the columns' norms
// sum C/(2 s2)·|P|^2. The torch path writes such rows (tens of MB a particle) to memory and
// reads them once in a batched GEMM; here they never leave the cache. AVX2 build: the eight
// children c of a row in the lanes, so one FMA with a broadcast projection value adds eight
// products, no horizontal sums.

constexpr int64_t kFineBlock = 64;  // voxels per block: a particle's rows for it stay in cache

// One chunk of the fine pass: projections of the children of U coarse orientations, the
// particles' weighted data and their offsets' phases, where to put each particle's scores.
template <typename T>
struct Fine {
  const T* proj;          // (U, 8, V, 2): child c of chunk parent u at row 8u + c
  const T* w;             // (b, V, 2) D/sigma^2
  const T* hc;            // (b, V) C/(2 sigma^2)
  const T* pp;            // (T_used, V, 2) phases of the coarse offsets
  const T* cp;            // (8, V, 2) phases of the children's steps
  const int64_t* t_pos;   // (b, n_tc) rows of pp per particle
  const int64_t* n_t;     // (b,) coarse offsets per particle
  const int64_t* rows;    // (g,) the chunk's particles
  const int64_t* par;     // (g, m_max) their parents' rows in the chunk
  const int64_t* n_par;   // (g,) parents in the chunk per particle
  const int64_t* slots;   // (g, m_max) their column blocks in scores
  T* scores;              // (b, s_rows, s_cols)
  int64_t V, n_tc, m_max, s_rows, s_cols;
};

// Per-thread work space of one particle: its rows for a block, its sums.
template <typename T>
struct FineBuffers {
  std::vector<T> z, y, h2, acc, acc_v, norm, norm_v;
};

// c = a * b for n interleaved complex numbers.
template <typename T>
D3D_INLINE void cmul(const T* a, const T* b, T* c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T ar = a[2 * j], ai = a[2 * j + 1], br = b[2 * j], bi = b[2 * j + 1];
    c[2 * j] = ar * br - ai * bi;
    c[2 * j + 1] = ar * bi + ai * br;
  }
}

// The particle's rows for voxels [v0, v0 + n): y[(8j + c)·2B + 2t] = pp_j·w·cp_c (complex).
template <typename T>
D3D_INLINE void fine_rows(const Fine<T>& p, int64_t row, int64_t nt, int64_t v0, int64_t n,
                          FineBuffers<T>& buf) {
  const T* w = p.w + 2 * (row * p.V + v0);
  for (int64_t j = 0; j < nt; ++j) {
    cmul<T>(p.pp + 2 * (p.t_pos[row * p.n_tc + j] * p.V + v0), w, buf.z.data(), n);
    for (int64_t c = 0; c < 8; ++c) {
      cmul<T>(buf.z.data(), p.cp + 2 * (c * p.V + v0), buf.y.data() + (8 * j + c) * 2 * kFineBlock,
              n);
    }
  }
}

// The projection row of column c (parent slot c / 8, child c % 8) of particle i at voxel v0.
template <typename T>
D3D_INLINE const T* fine_column(const Fine<T>& p, int64_t i, int64_t c, int64_t v0) {
  return p.proj + 2 * ((8 * p.par[i * p.m_max + c / 8] + c % 8) * p.V + v0);
}

// Scalar sums of voxels [v0, v0 + n) into buf.acc (R, C) and buf.norm (C).
template <typename T>
D3D_INLINE void fine_block(const Fine<T>& p, int64_t i, int64_t row, int64_t nt, int64_t m,
                           int64_t v0, int64_t n, FineBuffers<T>& buf) {
  fine_rows<T>(p, row, nt, v0, n, buf);
  const int64_t R = 8 * nt, C = 8 * m;
  const T* hc = p.hc + row * p.V + v0;
  for (int64_t c = 0; c < C; ++c) {
    const T* pc = fine_column<T>(p, i, c, v0);
    T s = 0;
    for (int64_t t = 0; t < n; ++t) s += hc[t] * (pc[2 * t] * pc[2 * t] + pc[2 * t + 1] * pc[2 * t + 1]);
    buf.norm[c] += s;
    for (int64_t r = 0; r < R; ++r) {
      const T* y = buf.y.data() + r * 2 * kFineBlock;
      T d = 0;
      for (int64_t k = 0; k < 2 * n; ++k) d += y[k] * pc[k];
      buf.acc[r * C + c] += d;
    }
  }
}

#if D3D_X86

constexpr int64_t kFetchAhead = 2;  // blocks

// Prefetch of one block's complex row (kFineBlock · 8 bytes).
D3D_INLINE void fetch_block(const float* row) {
  for (int64_t k = 0; k < 2 * kFineBlock; k += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(row + k), _MM_HINT_T0);
  }
}

__attribute__((target("avx2,fma"))) D3D_INLINE __m256 cmul8(__m256 a, __m256 b) {
  const __m256 b_re = _mm256_moveldup_ps(b), b_im = _mm256_movehdup_ps(b);
  const __m256 a_sw = _mm256_permute_ps(a, 0xB1);
  return _mm256_fmaddsub_ps(a, b_re, _mm256_mul_ps(a_sw, b_im));
}

// acc (8 x 8 floats) <-> eight registers, and a[c] += v * q_c[k] for the eight children c:
// with the loops unrolled (constant bounds, always inlined) the registers stay registers.
__attribute__((target("avx2,fma"))) D3D_INLINE void load8(const float* acc, __m256* a) {
  for (int c = 0; c < 8; ++c) a[c] = _mm256_loadu_ps(acc + 8 * c);
}
__attribute__((target("avx2,fma"))) D3D_INLINE void store8(const __m256* a, float* acc) {
  for (int c = 0; c < 8; ++c) _mm256_storeu_ps(acc + 8 * c, a[c]);
}
__attribute__((target("avx2,fma"))) D3D_INLINE void fma8(__m256 v, const float* q0, int64_t st,
                                                         int64_t k, __m256* a) {
  for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(v, _mm256_broadcast_ss(q0 + c * st + k), a[c]);
}

// acc (8 c', 8 c) += sum_k y[8k + c] q_c'[k] (q_c' = q + c'·st): one offset's rows against a
// parent's eight children.
__attribute__((target("avx2,fma"))) D3D_INLINE void gemm_1x8(const float* y, const float* q0,
                                                             int64_t st, int64_t n2, float* acc) {
  __m256 a[8];
  load8(acc, a);
  for (int64_t k = 0; k < n2; ++k) fma8(_mm256_loadu_ps(y + 8 * k), q0, st, k, a);
  store8(a, acc);
}

// gemm_1x8 with the offset's rows made in registers from z = D e(t_j) (interleaved) and the
// child phases cv (n, 2, 8): the same products, without storing and loading them.
__attribute__((target("avx2,fma"))) D3D_INLINE void gemm_1x8_rows(const float* z, const float* cv,
                                                                  const float* q0, int64_t st,
                                                                  int64_t n, float* acc) {
  __m256 a[8];
  load8(acc, a);
  for (int64_t t = 0; t < n; ++t) {
    const __m256 zr = _mm256_broadcast_ss(z + 2 * t), zi = _mm256_broadcast_ss(z + 2 * t + 1);
    const __m256 cr = _mm256_loadu_ps(cv + 16 * t), ci = _mm256_loadu_ps(cv + 16 * t + 8);
    fma8(_mm256_fmsub_ps(zr, cr, _mm256_mul_ps(zi, ci)), q0, st, 2 * t, a);
    fma8(_mm256_fmadd_ps(zr, ci, _mm256_mul_ps(zi, cr)), q0, st, 2 * t + 1, a);
  }
  store8(a, acc);
}

// gemm_1x8 for two offsets' rows y0, y1 and four children q0 .. q0 + 3 st into acc0, acc1
// (4 c', 8 c): each broadcast serves two FMAs.
__attribute__((target("avx2,fma"))) D3D_INLINE void gemm_2x4(const float* y0, const float* y1,
                                                             const float* q0, int64_t st,
                                                             int64_t n2, float* acc0,
                                                             float* acc1) {
  const float *q1 = q0 + st, *q2 = q1 + st, *q3 = q2 + st;
  __m256 a0 = _mm256_loadu_ps(acc0), a1 = _mm256_loadu_ps(acc0 + 8);
  __m256 a2 = _mm256_loadu_ps(acc0 + 16), a3 = _mm256_loadu_ps(acc0 + 24);
  __m256 b0 = _mm256_loadu_ps(acc1), b1 = _mm256_loadu_ps(acc1 + 8);
  __m256 b2 = _mm256_loadu_ps(acc1 + 16), b3 = _mm256_loadu_ps(acc1 + 24);
  for (int64_t k = 0; k < n2; ++k) {
    const __m256 u = _mm256_loadu_ps(y0 + 8 * k), v = _mm256_loadu_ps(y1 + 8 * k);
    __m256 x = _mm256_broadcast_ss(q0 + k);
    a0 = _mm256_fmadd_ps(u, x, a0);
    b0 = _mm256_fmadd_ps(v, x, b0);
    x = _mm256_broadcast_ss(q1 + k);
    a1 = _mm256_fmadd_ps(u, x, a1);
    b1 = _mm256_fmadd_ps(v, x, b1);
    x = _mm256_broadcast_ss(q2 + k);
    a2 = _mm256_fmadd_ps(u, x, a2);
    b2 = _mm256_fmadd_ps(v, x, b2);
    x = _mm256_broadcast_ss(q3 + k);
    a3 = _mm256_fmadd_ps(u, x, a3);
    b3 = _mm256_fmadd_ps(v, x, b3);
  }
  _mm256_storeu_ps(acc0, a0);
  _mm256_storeu_ps(acc0 + 8, a1);
  _mm256_storeu_ps(acc0 + 16, a2);
  _mm256_storeu_ps(acc0 + 24, a3);
  _mm256_storeu_ps(acc1, b0);
  _mm256_storeu_ps(acc1 + 8, b1);
  _mm256_storeu_ps(acc1 + 16, b2);
  _mm256_storeu_ps(acc1 + 24, b3);
}

// fine_block for float with AVX2 + FMA over voxels [v0, v0 + n), n a multiple of 4, the
// children in the lanes: for each coarse offset j the rows of its eight children as one
// vector per real component, y[k] = (D e(t_j) e(d_c))_k for c = 0..7 (cpt: the child phases
// (V, 2, 8), re and im of the eight children per voxel), then for each column c' (a child of
// the particle's parent s) acc_(j, s, c') += y[k] · P_c'[k]: one FMA gives the eight rows'
// products. Sums in buf.acc_v ((n_t, m, 8 c', 8 c) lanes) and norms hc·|P|^2 in buf.norm_v
// ((m, 8 c', 8 lanes over voxels)).
__attribute__((target("avx2,fma"))) void fine_block_avx2(const Fine<float>& p, const float* cpt,
                                                        int64_t i, int64_t row, int64_t nt,
                                                        int64_t m, int64_t v0, int64_t n,
                                                        FineBuffers<float>& buf) {
  const int64_t n2 = 2 * n;
  const float* w = p.w + 2 * (row * p.V + v0);
  const float* cv = cpt + 16 * v0;
  const int64_t ahead = v0 + kFetchAhead * kFineBlock;
  if (ahead < p.V) {  // a later block's weighted data and offset phases: rows read once a
    // particle, too many at a time for the hardware prefetchers
    for (int64_t j = 0; j < nt; ++j) {
      fetch_block(p.pp + 2 * (p.t_pos[row * p.n_tc + j] * p.V + ahead));
    }
    fetch_block(p.w + 2 * (row * p.V + ahead));
  }
  float* z = buf.z.data();
  float* y = buf.y.data();
  for (int64_t j = 0; j < nt; ++j) {  // the rows of every offset: y + 16 B j
    const float* pp = p.pp + 2 * (p.t_pos[row * p.n_tc + j] * p.V + v0);
    for (int64_t k = 0; k < n2; k += 8) {
      _mm256_storeu_ps(z + k, cmul8(_mm256_loadu_ps(pp + k), _mm256_loadu_ps(w + k)));
    }
    if (nt % 2 == 1 && j == nt - 1) break;  // a single offset's rows: built in the GEMM
    float* yj = y + 16 * kFineBlock * j;
    for (int64_t t = 0; t < n; ++t) {
      const __m256 zr = _mm256_broadcast_ss(z + 2 * t), zi = _mm256_broadcast_ss(z + 2 * t + 1);
      const __m256 cr = _mm256_loadu_ps(cv + 16 * t), ci = _mm256_loadu_ps(cv + 16 * t + 8);
      _mm256_storeu_ps(yj + 16 * t, _mm256_fmsub_ps(zr, cr, _mm256_mul_ps(zi, ci)));
      _mm256_storeu_ps(yj + 16 * t + 8, _mm256_fmadd_ps(zr, ci, _mm256_mul_ps(zi, cr)));
    }
  }
  const int64_t st = 2 * p.V;
  for (int64_t s = 0; s < m; ++s) {
    const float* q = fine_column<float>(p, i, 8 * s, v0);  // its children's rows: + 2V each
    int64_t j = 0;
    for (; j + 1 < nt; j += 2) {  // two offsets x four children: 6 loads for 8 FMAs
      const float* y0 = y + 16 * kFineBlock * j;
      float* acc0 = buf.acc_v.data() + 64 * (j * m + s);
      float* acc1 = buf.acc_v.data() + 64 * ((j + 1) * m + s);
      gemm_2x4(y0, y0 + 16 * kFineBlock, q, st, n2, acc0, acc1);
      gemm_2x4(y0, y0 + 16 * kFineBlock, q + 4 * st, st, n2, acc0 + 32, acc1 + 32);
    }
    if (j < nt) gemm_1x8_rows(z, cv, q, st, n, buf.acc_v.data() + 64 * (j * m + s));
  }
  const float* hc = p.hc + row * p.V + v0;
  float* h2 = buf.h2.data();  // C/(2 s2) for re and im
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t t = 0; t < n; t += 4) {
    const __m256 h = _mm256_castps128_ps256(_mm_loadu_ps(hc + t));
    _mm256_storeu_ps(h2 + 2 * t, _mm256_permutevar8x32_ps(h, dup));
  }
  for (int64_t c = 0; c < 8 * m; c += 4) {  // four columns' norms share each load of h2
    const float* q = fine_column<float>(p, i, c, v0);
    const int64_t st = 2 * p.V;
    float* nrm = buf.norm_v.data() + 8 * c;
    __m256 n0 = _mm256_loadu_ps(nrm), n1 = _mm256_loadu_ps(nrm + 8);
    __m256 n2v = _mm256_loadu_ps(nrm + 16), n3 = _mm256_loadu_ps(nrm + 24);
    for (int64_t k = 0; k < n2; k += 8) {
      const __m256 h = _mm256_loadu_ps(h2 + k);
      const __m256 x0 = _mm256_loadu_ps(q + k), x1 = _mm256_loadu_ps(q + st + k);
      const __m256 x2 = _mm256_loadu_ps(q + 2 * st + k), x3 = _mm256_loadu_ps(q + 3 * st + k);
      n0 = _mm256_fmadd_ps(_mm256_mul_ps(h, x0), x0, n0);
      n1 = _mm256_fmadd_ps(_mm256_mul_ps(h, x1), x1, n1);
      n2v = _mm256_fmadd_ps(_mm256_mul_ps(h, x2), x2, n2v);
      n3 = _mm256_fmadd_ps(_mm256_mul_ps(h, x3), x3, n3);
    }
    _mm256_storeu_ps(nrm, n0);
    _mm256_storeu_ps(nrm + 8, n1);
    _mm256_storeu_ps(nrm + 16, n2v);
    _mm256_storeu_ps(nrm + 24, n3);
  }
}
#endif

// One particle of the chunk: its sums over all voxels, then scores[row, 8j + c, 8·slot + c'].
template <typename T>
void fine_particle(const Fine<T>& p, const T* cpt, int64_t i, bool avx2, FineBuffers<T>& buf) {
  const int64_t row = p.rows[i], nt = p.n_t[row], m = p.n_par[i];
  const int64_t R = 8 * nt, C = 8 * m;
  buf.acc.assign(R * C, T(0));
  buf.norm.assign(C, T(0));
  int64_t v_vec = 0;  // voxels [0, v_vec) summed by the AVX2 loop
#if D3D_X86
  if constexpr (std::is_same_v<T, float>) {
    if (avx2) {
      buf.acc_v.assign(8 * R * C, 0.0f);
      buf.norm_v.assign(8 * C, 0.0f);
      v_vec = p.V & ~int64_t(3);
      for (int64_t v0 = 0; v0 < v_vec; v0 += kFineBlock) {
        fine_block_avx2(p, cpt, i, row, nt, m, v0, std::min(kFineBlock, v_vec - v0), buf);
      }
      for (int64_t j = 0; j < nt; ++j) {  // lanes (j, s, c', c) -> acc (8j + c, 8s + c')
        for (int64_t s = 0; s < m; ++s) {
          const float* a = buf.acc_v.data() + 64 * (j * m + s);
          for (int64_t c2 = 0; c2 < 8; ++c2) {
            for (int64_t c = 0; c < 8; ++c) buf.acc[(8 * j + c) * C + 8 * s + c2] = a[8 * c2 + c];
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        float s = 0.0f;
        for (int l = 0; l < 8; ++l) s += buf.norm_v[8 * c + l];
        buf.norm[c] = s;
      }
    }
  }
#endif
  for (int64_t v0 = v_vec; v0 < p.V; v0 += kFineBlock) {
    fine_block<T>(p, i, row, nt, m, v0, std::min(kFineBlock, p.V - v0), buf);
  }
  for (int64_t r = 0; r < R; ++r) {
    T* dst = p.scores + (row * p.s_rows + r) * p.s_cols;
    for (int64_t s = 0; s < m; ++s) {
      const int64_t col = 8 * p.slots[i * p.m_max + s];
      for (int64_t c = 0; c < 8; ++c) dst[col + c] = buf.acc[r * C + 8 * s + c] - buf.norm[8 * s + c];
    }
  }
}

template <typename T>
void fine_scores_impl(const Fine<T>& p, int64_t g, bool simd) {
  const bool avx2 = use_avx2<T>(simd);
  // the child phases with the children innermost, (V, 2, 8), for the AVX2 rows
  std::vector<T> cpt(avx2 ? 16 * p.V : 0);
  if (avx2) {
    at::parallel_for(0, p.V, 4096, [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        for (int64_t c = 0; c < 8; ++c) {
          cpt[16 * v + c] = p.cp[2 * (c * p.V + v)];
          cpt[16 * v + 8 + c] = p.cp[2 * (c * p.V + v) + 1];
        }
      }
    });
  }
  // Particles by their work (offsets x parents), largest first, handed out one at a time:
  // the chunk's particles come sorted smallest first, and contiguous ranges, one a thread, left
  // one thread with most of the work (mini-batches of 200 at box 64, 2 threads: the kernel's
  // wall time 0.53 -> 0.31 s, fine_search's 0.33-0.36 -> 0.27-0.37 s, medians of 5 in 3 paired
  // runs, the same CPU time). Each particle's sums do not depend on who computes them.
  std::vector<int64_t> order(g);
  for (int64_t i = 0; i < g; ++i) order[i] = i;
  auto work = [&](int64_t i) { return p.n_t[p.rows[i]] * p.n_par[i]; };
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return work(a) > work(b); });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    FineBuffers<T> buf;
    buf.z.resize(2 * kFineBlock);
    buf.h2.resize(2 * kFineBlock);
    buf.y.resize(8 * std::max<int64_t>(p.n_tc, 2) * 2 * kFineBlock);
    for (int64_t k = next++; k < g; k = next++) {
      fine_particle<T>(p, cpt.data(), order[k], avx2, buf);
    }
  });
}

// The fine pass's scores of one chunk of coarse orientations (real views of complex arrays):
// proj (U, 8, V, 2), weighted (b, V, 2) = D/sigma^2, half_c (b, V) = C/(2 sigma^2), parent_phases
// (T_used, V, 2), child_phases (8, V, 2), parent_pos (b, n_tc) and n_t (b,) int64: each particle's
// coarse offsets; rows (g,), par (g, m), n_par (g,), slots (g, m) int64: the chunk's particles,
// their parents' rows in proj and column blocks in scores (b, 8 n_tc, s_cols), into which
// scores[row, 8j + c, 8 slot + c'] = Re(conj(D e(t_j) e(d_c)) P_(par, c')) - sum hc |P|^2 go.
void fine_scores(const at::Tensor& proj, const at::Tensor& weighted, const at::Tensor& half_c,
                 const at::Tensor& parent_phases, const at::Tensor& child_phases,
                 const at::Tensor& parent_pos, const at::Tensor& n_t, const at::Tensor& rows,
                 const at::Tensor& par, const at::Tensor& n_par, const at::Tensor& slots,
                 const at::Tensor& scores, bool simd) {
  const int64_t V = weighted.size(1), b = weighted.size(0), g = rows.size(0);
  TORCH_CHECK(proj.dim() == 4 && proj.size(1) == 8 && proj.size(2) == V && proj.size(3) == 2
                  && proj.is_contiguous(), "proj (U, 8, V, 2) contiguous");
  TORCH_CHECK(weighted.dim() == 3 && weighted.size(2) == 2 && weighted.is_contiguous(),
              "weighted (b, V, 2) contiguous");
  TORCH_CHECK(half_c.dim() == 2 && half_c.size(0) == b && half_c.size(1) == V
                  && half_c.is_contiguous(), "half_c (b, V) contiguous");
  TORCH_CHECK(parent_phases.dim() == 3 && parent_phases.size(1) == V && parent_phases.size(2) == 2
                  && parent_phases.is_contiguous(), "parent_phases (T, V, 2) contiguous");
  TORCH_CHECK(child_phases.dim() == 3 && child_phases.size(0) == 8 && child_phases.size(1) == V
                  && child_phases.size(2) == 2 && child_phases.is_contiguous(),
              "child_phases (8, V, 2) contiguous");
  TORCH_CHECK(parent_pos.dim() == 2 && parent_pos.size(0) == b && parent_pos.is_contiguous()
                  && n_t.dim() == 1 && n_t.size(0) == b && n_t.is_contiguous(),
              "parent_pos (b, n_tc), n_t (b,) contiguous");
  TORCH_CHECK(rows.dim() == 1 && rows.is_contiguous() && par.dim() == 2 && par.size(0) == g
                  && par.is_contiguous() && slots.sizes() == par.sizes() && slots.is_contiguous()
                  && n_par.dim() == 1 && n_par.size(0) == g && n_par.is_contiguous(),
              "rows (g,), par and slots (g, m), n_par (g,) contiguous");
  for (const at::Tensor* t : {&parent_pos, &n_t, &rows, &par, &n_par, &slots}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "int64 indices");
  }
  const int64_t n_tc = parent_pos.size(1), m_max = par.size(1);
  TORCH_CHECK(scores.dim() == 3 && scores.size(0) == b && scores.size(1) == 8 * n_tc
                  && scores.is_contiguous(), "scores (b, 8 n_tc, cols) contiguous");
  const int64_t* np = n_t.const_data_ptr<int64_t>();
  const int64_t* rw = rows.const_data_ptr<int64_t>();
  const int64_t* pa = par.const_data_ptr<int64_t>();
  const int64_t* npar = n_par.const_data_ptr<int64_t>();
  const int64_t* sl = slots.const_data_ptr<int64_t>();
  const int64_t* tp = parent_pos.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < g; ++i) {  // every index checked: the kernel trusts them
    TORCH_CHECK(rw[i] >= 0 && rw[i] < b, "rows in [0, b)");
    TORCH_CHECK(np[rw[i]] >= 0 && np[rw[i]] <= n_tc, "n_t in [0, n_tc]");
    TORCH_CHECK(npar[i] >= 0 && npar[i] <= m_max, "n_par in [0, m]");
    for (int64_t j = 0; j < np[rw[i]]; ++j) {
      const int64_t t = tp[rw[i] * n_tc + j];
      TORCH_CHECK(t >= 0 && t < parent_phases.size(0), "parent_pos in range");
    }
    for (int64_t s = 0; s < npar[i]; ++s) {
      TORCH_CHECK(pa[i * m_max + s] >= 0 && pa[i * m_max + s] < proj.size(0), "par in range");
      TORCH_CHECK(sl[i * m_max + s] >= 0 && 8 * sl[i * m_max + s] + 8 <= scores.size(2),
                  "slots in range");
    }
  }
  const auto dtype = weighted.scalar_type();
  for (const at::Tensor* t : {&proj, &half_c, &parent_phases, &child_phases, &scores}) {
    TORCH_CHECK(t->scalar_type() == dtype, "one real dtype for the data arrays");
  }
  auto run = [&](auto zero) {
    using T = decltype(zero);
    Fine<T> p{proj.const_data_ptr<T>(), weighted.const_data_ptr<T>(), half_c.const_data_ptr<T>(),
              parent_phases.const_data_ptr<T>(), child_phases.const_data_ptr<T>(), tp, np, rw, pa,
              npar, sl, scores.mutable_data_ptr<T>(), V, n_tc, m_max, scores.size(1),
              scores.size(2)};
    fine_scores_impl<T>(p, g, simd);
  };
  if (dtype == at::kFloat) {
    run(0.0f);
  } else {
    TORCH_CHECK(dtype == at::kDouble, "float32 or float64");
    run(0.0);
  }
}

}  // namespace

TORCH_LIBRARY(denovo3d, m) {
  m.def(
      "rotate(Tensor table, Tensor rotations, Tensor coords, int r, Tensor(a!) out, "
      "bool simd=True) -> ()");
  m.def(
      "splat(Tensor values, Tensor weights, Tensor rotations, Tensor coords, int r, "
      "Tensor(a!) acc, bool simd=True) -> ()");
  m.impl("rotate", c10::DispatchKey::CPU, TORCH_FN(rotate));
  m.def(
      "fine_scores(Tensor proj, Tensor weighted, Tensor half_c, Tensor parent_phases, "
      "Tensor child_phases, Tensor parent_pos, Tensor n_t, Tensor rows, Tensor par, "
      "Tensor n_par, Tensor slots, Tensor(a!) scores, bool simd=True) -> ()");
  m.impl("splat", c10::DispatchKey::CPU, TORCH_FN(splat));
  m.impl("fine_scores", c10::DispatchKey::CPU, TORCH_FN(fine_scores));
}
