// Flash attention over packed variable-length sequences on the CPU (no padding anywhere).
//
// q [T, Hq, D], k/v [T, Hkv, D] (bf16 or fp32, last dim contiguous), cu_seqlens [B+1].
// Phase 1 packs every (sequence, kv head, key block) once: K^T and V in the layout the GEMM
// wants (VNNI pairs for bf16 on AMX), tails zero-padded to a multiple of the tile width.
// Phase 2 runs one work item per (sequence, query head, block of query rows): S = Q K^T in
// float32 (brgemm), online softmax in float32, O += P V in float32 (brgemm; bf16 P as two
// bf16 parts, high and remainder, unless split_p is off), O / l written out. Work items are
// split among threads by their cost.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::BFloat16;
constexpr int64_t kRowTile = 16;  // query rows are padded to whole AMX tile rows

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Stores one vector of floats as T (bf16: rounded to nearest even) and returns what was stored,
// as floats: the softmax sums the weights the P.V GEMM sees.
template <typename T> __m512 store(__m512 x, T* dst) {
  if constexpr (std::is_same_v<T, BFloat16>) {
#ifdef __AVX512BF16__
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
#else
    const __m256i h = at::vec::cvtfp32_bf16(x);
#endif
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    _mm512_storeu_ps(dst, x);
    return x;
  }
}

// Key columns of a block are padded to this many (zero keys, masked scores).
template <typename T> constexpr int64_t col_tile() { return 16; }

// Transposes 16 rows of 16 32-bit words in registers: r[i][j] -> r[j][i].
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_epi32(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_epi32(r[k], r[k + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], 128-bit lane L: column 4L + c of rows g..g+3
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // then a 4x4 transpose of 128-bit lanes
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i x2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 2, 3, 2));
    r[c] = _mm512_shuffle_i32x4(x0, x2, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + c] = _mm512_shuffle_i32x4(x0, x2, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + c] = _mm512_shuffle_i32x4(x1, x3, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + c] = _mm512_shuffle_i32x4(x1, x3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// K^T of `n` key rows, padded to `n_pad` columns. bf16: VNNI [D/2][n_pad][2], i.e. a transpose
// of 32-bit (d, d+1) pairs; fp32: plain [D][n_pad]. Either way a transpose of 32-bit words,
// 16 x 16 at a time.
template <typename T>
void pack_keys(const T* k, int64_t stride, int64_t n, int64_t n_pad, int64_t d, T* out) {
  const int64_t words = d * sizeof(T) / 4;
  int32_t* dst = reinterpret_cast<int32_t*>(out);
  __m512i r[16];
  for (int64_t c = 0; c < n_pad; c += 16) {
    for (int64_t w = 0; w < words; w += 16) {
      for (int i = 0; i < 16; ++i)
        r[i] = c + i < n ? _mm512_loadu_si512(reinterpret_cast<const int32_t*>(
                               k + (c + i) * stride) + w)
                         : _mm512_setzero_si512();
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (w + j) * n_pad + c, r[j]);
    }
  }
}

// V of `n` rows padded to `n_pad` rows. bf16: VNNI [n_pad/2][D][2] (rows interleaved in
// pairs); fp32: plain [n_pad][D].
template <typename T>
void pack_values(const T* v, int64_t stride, int64_t n, int64_t n_pad, int64_t d, T* out) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    alignas(64) static const int16_t lo_idx[32] = {
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    alignas(64) static const int16_t hi_idx[32] = {
        16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
        24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
    for (int64_t r = 0; r < n_pad; r += 2) {
      T* dst = out + r * d;
      for (int64_t j = 0; j < d; j += 32) {
        const __m512i a = r < n ? _mm512_loadu_si512(v + r * stride + j) : _mm512_setzero_si512();
        const __m512i b = r + 1 < n ? _mm512_loadu_si512(v + (r + 1) * stride + j)
                                    : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + 2 * j, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(dst + 2 * j + 32, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
  } else {
    for (int64_t r = 0; r < n; ++r) std::memcpy(out + r * d, v + r * stride, d * sizeof(T));
    std::fill(out + n * d, out + n_pad * d, T(0));
  }
}

// A grow-only buffer per thread and purpose: no allocation (nor page faults) per call.
template <typename T, int Slot> T* scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// 2^x for x <= 0 in float32, relative error < 3e-6 (P is rounded to bf16 anyway): a degree-4
// polynomial on the fraction, scaled by the integer part. x below -100 (masked: -inf) gives
// 2^-100, nothing next to the row's maximum, which contributes 1.
inline __m512 exp2_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009560520f), f, _mm512_set1_ps(0.05591712f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024981f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69312197f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99999917f));
  return _mm512_scalef_ps(p, n);
}

// One row of scores: masks columns outside [lo, hi), updates the running max `m` and sum `l`,
// writes 2^((s - m) * scale_log2) to `p` and returns the factor the row's old output must take.
template <typename T>
float softmax_row(float* s, int64_t lo, int64_t hi, int64_t n_pad, float scale_log2, float& m,
                  float& l, T* p, T* p_lo) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(s, s + lo, neg_inf);
  std::fill(s + std::max(lo, hi), s + n_pad, neg_inf);
  __m512 vmax = _mm512_set1_ps(neg_inf);
  for (int64_t c = 0; c < n_pad; c += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + c));
  const float m_new = std::max(m, _mm512_reduce_max_ps(vmax));
  if (m_new == neg_inf) {  // no key of this block (nor before) in the row's window
    std::fill(p, p + n_pad, T(0));
    if (p_lo) std::fill(p_lo, p_lo + n_pad, T(0));
    return 0.0f;
  }
  const float alpha = m == neg_inf ? 0.0f : std::exp2((m - m_new) * scale_log2);
  const __m512 vscale = _mm512_set1_ps(scale_log2), vshift = _mm512_set1_ps(-m_new * scale_log2);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n_pad; c += 16) {
    const __m512 e = exp2_neg(_mm512_fmadd_ps(_mm512_loadu_ps(s + c), vscale, vshift));
    const __m512 stored = store(e, p + c);
    if (p_lo) {
      store(_mm512_sub_ps(e, stored), p_lo + c);
      vsum = _mm512_add_ps(vsum, e);
    } else {
      vsum = _mm512_add_ps(vsum, stored);
    }
  }
  m = m_new;
  l = l * alpha + _mm512_reduce_add_ps(vsum);
  return alpha;
}

// The key blocks a block of query rows [q0, q0 + rows) may see under window (left, right)
// (-1: unbounded): [first block start, end).
std::pair<int64_t, int64_t> key_range(int64_t q0, int64_t rows, int64_t len, int64_t left,
                                      int64_t right, int64_t block_n) {
  const int64_t lo = left < 0 ? 0 : std::max<int64_t>(0, q0 - left);
  const int64_t hi = right < 0 ? len : std::min(len, q0 + rows + right);
  return {lo / block_n * block_n, hi};
}

struct Layout {
  std::vector<int64_t> starts;      // B+1 token offsets
  std::vector<int64_t> block_base;  // B+1: first key block of each sequence
  std::vector<int64_t> pad_base;    // B+1: first packed key row of each sequence
  int64_t num_blocks = 0;
};

template <typename T>
void attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
               const Layout& lay, int64_t left, int64_t right, float scale, int64_t block_m,
               int64_t block_n, bool split_p) {
  constexpr bool vnni = std::is_same_v<T, BFloat16>;
  const int64_t hq = q.size(1), hkv = k.size(1), d = q.size(2), group = hq / hkv;
  const int64_t batch = static_cast<int64_t>(lay.starts.size()) - 1;
  const float scale_log2 = scale * 1.4426950408889634f;
  const int64_t padded = lay.pad_base.back();  // packed key rows per kv head
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);

  // Phase 1: pack K^T and V of every (kv head, key block); block j of sequence b starts at
  // packed row pad_base[b] + j * block_n.
  T* kb = scratch<T, 0>(2 * hkv * padded * d);
  T* vb = kb + hkv * padded * d;
  std::vector<int64_t> block_seq(lay.num_blocks);
  for (int64_t b = 0; b < batch; ++b)
    std::fill(block_seq.begin() + lay.block_base[b], block_seq.begin() + lay.block_base[b + 1], b);
  at::parallel_for(0, hkv * lay.num_blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / lay.num_blocks, blk = i % lay.num_blocks, b = block_seq[blk];
      const int64_t k0 = (blk - lay.block_base[b]) * block_n;
      const int64_t n = std::min(block_n, lay.starts[b + 1] - lay.starts[b] - k0);
      const int64_t n_pad = round_up(n, col_tile<T>());
      const int64_t row = lay.starts[b] + k0;
      const int64_t off = (g * padded + lay.pad_base[b] + k0) * d;
      pack_keys(kp + row * ks0 + g * ks1, ks0, n, n_pad, d, kb + off);
      pack_values(vp + row * vs0 + g * vs1, vs0, n, n_pad, d, vb + off);
    }
  });

  // Phase 2: work items (sequence, head, query block), cost ~ rows x keys attended.
  struct Item { int64_t b, h, q0; };
  std::vector<Item> items;
  std::vector<double> cost_end;
  double total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lay.starts[b + 1] - lay.starts[b];
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t q0 = 0; q0 < len; q0 += block_m) {
        const int64_t rows = std::min(block_m, len - q0);
        const auto [k_lo, k_hi] = key_range(q0, rows, len, left, right, block_n);
        total += static_cast<double>(round_up(rows, kRowTile)) * (round_up(k_hi - k_lo, 32) + 64);
        items.push_back({b, h, q0});
        cost_end.push_back(total);
      }
  }
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                 items.size()));
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    const auto first = std::lower_bound(cost_end.begin(), cost_end.end(),
                                        total * t_begin / threads) - cost_end.begin();
    const auto last = t_end == threads ? static_cast<int64_t>(items.size())
        : std::lower_bound(cost_end.begin(), cost_end.end(), total * t_end / threads) -
              cost_end.begin();
    const int64_t m_cap = round_up(block_m, kRowTile);
    T* qbuf = scratch<T, 1>(m_cap * (d + 2 * block_n));
    T* p = qbuf + m_cap * d;
    T* p_lo = split_p ? p + m_cap * block_n : nullptr;
    float* s = scratch<float, 2>(m_cap * (block_n + d + 2));
    float* o = s + m_cap * block_n;
    float* row_max = o + m_cap * d;
    float* row_sum = row_max + m_cap;
    for (int64_t it = first; it < last; ++it) {
      const auto [b, h, q0] = items[it];
      const int64_t start = lay.starts[b], len = lay.starts[b + 1] - start;
      const int64_t rows = std::min(block_m, len - q0), m_pad = round_up(rows, kRowTile);
      const int64_t g = h / group;
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(qbuf + r * d, qp + (start + q0 + r) * qs0 + h * qs1, d * sizeof(T));
      std::fill(qbuf + rows * d, qbuf + m_pad * d, T(0));
      std::fill(row_max, row_max + m_cap, -std::numeric_limits<float>::infinity());
      std::fill(row_sum, row_sum + m_cap, 0.0f);
      const auto [k_lo, k_hi] = key_range(q0, rows, len, left, right, block_n);
      for (int64_t k0 = k_lo; k0 < k_hi; k0 += block_n) {
        const int64_t n = std::min(block_n, len - k0), n_pad = round_up(n, col_tile<T>());
        const int64_t off = (g * padded + lay.pad_base[b] + k0) * d;
        const T* kt = kb + off;
        const T* vt = vb + off;
        at::native::cpublas::brgemm(m_pad, n_pad, d, d, n_pad, n_pad, false, qbuf, kt,
                                    s, vnni);
        for (int64_t r = 0; r < m_pad; ++r) {
          const int64_t pos = q0 + std::min(r, rows - 1) - k0;  // padding rows copy the last
          const int64_t lo = left < 0 ? 0 : std::clamp<int64_t>(pos - left, 0, n);
          const int64_t hi = right < 0 ? n : std::clamp<int64_t>(pos + right + 1, 0, n);
          const float alpha = softmax_row(s + r * n_pad, lo, hi, n_pad,
                                          scale_log2, row_max[r], row_sum[r], p + r * n_pad,
                                          p_lo ? p_lo + r * n_pad : nullptr);
          if (k0 > k_lo) {
            float* orow = o + r * d;
            for (int64_t j = 0; j < d; j += 16)
              _mm512_storeu_ps(orow + j, _mm512_mul_ps(_mm512_loadu_ps(orow + j),
                                                       _mm512_set1_ps(alpha)));
          }
        }
        at::native::cpublas::brgemm(m_pad, d, n_pad, n_pad, d, d, k0 > k_lo, p, vt,
                                    o, vnni);
        if (p_lo)
          at::native::cpublas::brgemm(m_pad, d, n_pad, n_pad, d, d, true, p_lo, vt, o, vnni);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.0f / row_sum[r];
        const float* orow = o + r * d;
        T* dst = op + ((start + q0 + r) * hq + h) * d;
        for (int64_t j = 0; j < d; j += 16) {
          store(_mm512_mul_ps(_mm512_loadu_ps(orow + j), _mm512_set1_ps(inv)), dst + j);
        }
      }
    }
    at::native::cpublas::brgemm_release(vnni);
  });
}

at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens, int64_t left, int64_t right,
                            double scale, int64_t block_m, int64_t block_n, bool split_p) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [T, heads, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
              cu_seqlens.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "q, k, v shapes disagree");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  const int64_t d = q.size(2);
  TORCH_CHECK(d % 32 == 0 && d <= 256, "head size must be a multiple of 32, <= 256");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "the head dimension must be contiguous");
  TORCH_CHECK(block_m > 0 && block_n > 0 && block_n % 32 == 0, "bad block sizes");
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  Layout lay;
  lay.starts.assign(cu.const_data_ptr<int64_t>(), cu.const_data_ptr<int64_t>() + cu.numel());
  TORCH_CHECK(lay.starts.size() >= 1 && lay.starts.front() == 0 &&
              lay.starts.back() == q.size(0), "cu_seqlens must run from 0 to T");
  const int64_t tile = q.scalar_type() == at::kBFloat16 ? col_tile<BFloat16>() : col_tile<float>();
  lay.block_base.push_back(0);
  lay.pad_base.push_back(0);
  for (size_t b = 0; b + 1 < lay.starts.size(); ++b) {
    const int64_t len = lay.starts[b + 1] - lay.starts[b];
    TORCH_CHECK(len >= 0, "cu_seqlens must not decrease");
    lay.num_blocks += (len + block_n - 1) / block_n;
    lay.block_base.push_back(lay.num_blocks);
    lay.pad_base.push_back(lay.pad_base.back() + len / block_n * block_n +
                           round_up(len % block_n, tile));
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), d}, q.options());
  if (q.size(0) == 0) return out;
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    attention<BFloat16>(q, k, v, out, lay, left, right, s, block_m, block_n, split_p);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "bf16 or fp32 only");
    attention<float>(q, k, v, out, lay, left, right, s, block_m, block_n, false);
  }
  return out;
}

bool amx_bf16() { return at::native::cpublas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY(tagserve_cpu, m) {
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int left, int right, "
        "float scale, int block_m, int block_n, bool split_p) -> Tensor", &varlen_attention);
  m.def("amx_bf16() -> bool", &amx_bf16);
}
