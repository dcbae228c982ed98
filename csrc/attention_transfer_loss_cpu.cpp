// attention_transfer_loss_cpu.cpp: the CPU kernels of the attention-transfer loss (contract and math:
// attention_transfer_loss.h). Nothing of size N_q x N_k is ever allocated.
//
// Tiling. A thread takes one head (b, h) (the forward: one chunk of kChunkRows query rows of a head; the
// backward, with fewer heads than threads: a part of its query rows, see attention_transfer_backward_cpu),
// converts its keys to fp32 once, transposed (D x N_k), and walks the queries in blocks of kBlockRows rows:
//   scores   S_s = (scale_s q_s) k_s^T and S_t = (scale_t q_t) k_t^T for the block's rows, kBlockRows x N_k
//            each (2 x 128 KiB at N_k = 2048: they stay in L2), each one small GEMM;
//   forward  per row, vectorized passes over its scores: maxima, exps and sums (2 exps per score), the KL;
//   backward dS = w (A_s - A_t) in place of S_s (A from the stored lse), then
//            dq (block) = scale_s dS k_s     and     dk (head) += dS^T (scale_s q_s),
//            dk accumulating in an fp32 N_k x D_s buffer written out when the head is done.
// Causal blocks stop at the last key that their last row sees.
//
// The GEMMs share one register-tiled loop (tile_product): a kRows x kLanes tile of the output stays in
// registers (4 AVX-512 vectors) while the inner dimension streams kLanes-wide segments of the right
// operand, so each load feeds kRows FMAs. Memory traffic per head: q, k of both models read once
// (the keys again from L2 per query block), dq and dk written once, 12 bytes per row of statistics;
// against the reference, which writes and reads N_q x N_k maps. Work: 2 N_q N_k (D_s + D_t) FLOPs
// forward; the backward adds 4 N_q N_k D_s for dq and dk.
//
// Per-thread scratch: O(N_k (D_s + D_t) + kBlockRows N_k) floats (about 2.5 MiB at N = 2048, D = 64), plus,
// for a backward split into parts, an N_k x D_s fp32 buffer per part (about one per thread).
// Deterministic: every output element is written by one thread, and for a given thread count the parts of a
// split backward are summed in one order (the count of parts follows the thread count). The functions
// that loop are compiled for AVX-512, AVX2 and baseline x86-64 (TSA_CPU_CLONES, numerics.h).
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "attention_transfer_loss.h"
#include "numerics.h"

namespace tsa_fast {
namespace {

constexpr int64_t kRows = 4;         // output rows of a register tile
constexpr int64_t kLanes = 16;       // output columns of a register tile: one AVX-512 vector of fp32
constexpr int64_t kBlockRows = 16;   // query rows per block, a multiple of kRows
constexpr int64_t kChunkRows = 256;  // query rows per forward work item

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

int64_t max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// c[r, j] = (c[r, j] if kAccumulate) + sum_k a[r, k] b[k, j] for r < rows, j < cols; fp32, row-major with
// leading dimensions lda, ldb, ldc; rows a multiple of kRows, cols of kLanes. For each kLanes-wide column
// panel of b (depth x kLanes, in L1 for every row group of a), each kRows x kLanes tile of c is held in
// registers while k runs: one load of b feeds kRows FMAs.
template <bool kAccumulate>
TSA_ALWAYS_INLINE void tile_product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                                    int64_t rows, int64_t cols, float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < cols; j0 += kLanes) {
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      float acc[kRows][kLanes];
      for (int64_t r = 0; r < kRows; ++r)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[r][l] = kAccumulate ? c[(r0 + r) * ldc + j0 + l] : 0.0f;
      for (int64_t k = 0; k < depth; ++k) {
        const float* b_row = b + k * ldb + j0;
        for (int64_t r = 0; r < kRows; ++r) {
          const float a_rk = a[(r0 + r) * lda + k];
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[r][l] += a_rk * b_row[l];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) c[(r0 + r) * ldc + j0 + l] = acc[r][l];
    }
  }
}

// The (b, h) slice of a HeadTensor: row i is data + i * stride_n.
template <class T>
struct Head {
  T* data;
  int64_t stride_n;
  T* row(int64_t i) const { return data + i * stride_n; }
};

template <class T>
Head<T> head_of(const HeadTensor& x, int64_t b, int64_t h) {
  return {static_cast<T*>(x.data) + b * x.stride_b + h * x.stride_h, x.stride_n};
}

// out[d, j] = x[j, d] in fp32 for j < n, and 0 for n <= j < ld: keys, transposed.
template <class T>
TSA_ALWAYS_INLINE void load_transposed(Head<T> x, int64_t n, int64_t dim, int64_t ld, float* out) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < dim; ++d) out[d * ld + j] = to_float(x.row(j)[d]);
  for (int64_t d = 0; d < dim; ++d) std::fill(out + d * ld + n, out + (d + 1) * ld, 0.0f);
}

// out[r, d] = scale * x[first + r, d] in fp32 for r < n; zero elsewhere in the padded_rows x ld block.
template <class T>
TSA_ALWAYS_INLINE void load_rows(Head<T> x, int64_t first, int64_t n, int64_t dim, float scale, int64_t padded_rows,
                                 int64_t ld, float* out) {
  std::fill(out, out + padded_rows * ld, 0.0f);
  for (int64_t r = 0; r < n; ++r)
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) out[r * ld + d] = scale * to_float(x.row(first + r)[d]);
}

// x[first + r, d] = scale * in[r, d] for r < n, d < dim, rounded to x's dtype (in: fp32, leading dimension ld).
template <class T>
TSA_ALWAYS_INLINE void store_rows(const float* in, int64_t ld, int64_t n, int64_t dim, float scale, Head<T> x,
                                  int64_t first) {
  for (int64_t r = 0; r < n; ++r)
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) x.row(first + r)[d] = from_float<T>(scale * in[r * ld + d]);
}

// The problem's sizes, and what one head sees.
struct Geometry {
  const AttentionTransferParams& p;
  // The columns of score rows and transposed keys: N_k rounded up to an odd multiple of kLanes, so that a
  // column panel of the transposed keys (rows ldk apart) spreads over the L1 sets instead of one set.
  int64_t ldk;
  int64_t ld_ds;  // D_s rounded up to kLanes: the columns of the student's query block, dq and dk

  explicit Geometry(const AttentionTransferParams& params)
      : p(params), ldk(round_up(params.n_k, 2 * kLanes) + kLanes), ld_ds(round_up(params.d_s, kLanes)) {}

  // Keys [0, key_end(i)) may be visible to query row i (causal: aligned bottom-right); may be <= 0.
  int64_t key_end(int64_t i) const { return p.causal ? std::min(p.n_k, i + p.n_k - p.n_q + 1) : p.n_k; }

  const uint8_t* keep(int64_t b) const {
    return p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + b * p.mask_stride_b;
  }

  // Self-attention: the row of a padded position does not count.
  bool row_kept(const uint8_t* keep, int64_t i) const { return keep == nullptr || p.n_q != p.n_k || keep[i] != 0; }

  int64_t row_index(int64_t b, int64_t h, int64_t i) const { return (b * p.heads + h) * p.n_q + i; }
};

// Scores of keys that the mask drops become -inf (out of both softmaxes).
TSA_ALWAYS_INLINE void drop_masked_keys(float* scores, int64_t n, const uint8_t* keep) {
  if (keep == nullptr) return;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) scores[j] = keep[j] != 0 ? scores[j] : -INFINITY;
}

TSA_ALWAYS_INLINE float row_max(const float* x, int64_t n) {
  float max = -INFINITY;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) max = x[j] > max ? x[j] : max;
  return max;
}

// Per-thread fp32 buffers.
struct Workspace {
  std::vector<float> keys_s_t, keys_t_t;      // D x ldk: the head's keys, transposed
  std::vector<float> queries_s, queries_t;    // kBlockRows x ld_ds, kBlockRows x D_t: scaled queries
  std::vector<float> scores_s, scores_t;      // kBlockRows x ldk (backward: dS in scores_s)
  std::vector<float> exp_t;                   // ldk: the teacher's exps of one row (forward)
  std::vector<float> keys_s;                  // ldk x ld_ds: the student's keys, row-major (backward)
  std::vector<float> grad_scores_t;           // ldk x kBlockRows: dS^T (backward)
  std::vector<float> grad_q;                  // kBlockRows x ld_ds: dq of a block (backward)
  std::vector<float> grad_k;                  // ldk x ld_ds: a head's dk (backward, one item per head)

  Workspace(const Geometry& g, bool backward, bool with_grad_k = false)
      : keys_s_t(g.p.d_s * g.ldk), keys_t_t(g.p.d_t * g.ldk), queries_s(kBlockRows * g.ld_ds),
        queries_t(kBlockRows * g.p.d_t), scores_s(kBlockRows * g.ldk), scores_t(kBlockRows * g.ldk),
        exp_t(backward ? 0 : g.ldk), keys_s(backward ? g.ldk * g.ld_ds : 0),
        grad_scores_t(backward ? g.ldk * kBlockRows : 0), grad_q(backward ? kBlockRows * g.ld_ds : 0),
        grad_k(with_grad_k ? g.ldk * g.ld_ds : 0) {}
};

// Both models' scores for query rows [first, first + n) against keys [0, cols) (cols a multiple of kLanes).
template <class Student, class Teacher>
TSA_ALWAYS_INLINE void block_scores(const Geometry& g, int64_t b, int64_t h, int64_t first, int64_t n, int64_t cols,
                                    Workspace& ws) {
  const AttentionTransferParams& p = g.p;
  const int64_t rows = round_up(n, kRows);
  load_rows(head_of<Student>(p.q_s, b, h), first, n, p.d_s, p.scale_s, kBlockRows, g.ld_ds, ws.queries_s.data());
  load_rows(head_of<Teacher>(p.q_t, b, h), first, n, p.d_t, p.scale_t, kBlockRows, p.d_t, ws.queries_t.data());
  tile_product<false>(ws.queries_s.data(), g.ld_ds, ws.keys_s_t.data(), g.ldk, p.d_s, rows, cols,
                      ws.scores_s.data(), g.ldk);
  tile_product<false>(ws.queries_t.data(), p.d_t, ws.keys_t_t.data(), g.ldk, p.d_t, rows, cols,
                      ws.scores_t.data(), g.ldk);
}

// Forward of query rows [first, last) of head (b, h): kl, lse_s, lse_t per row.
template <class Student, class Teacher>
TSA_CPU_CLONES void forward_chunk(const Geometry& g, int64_t b, int64_t h, int64_t first, int64_t last,
                                  Workspace& ws) {
  const AttentionTransferParams& p = g.p;
  const uint8_t* keep = g.keep(b);
  const int64_t keys = std::max<int64_t>(0, g.key_end(last - 1));  // the keys any row of the chunk sees
  load_transposed(head_of<Student>(p.k_s, b, h), keys, p.d_s, g.ldk, ws.keys_s_t.data());
  load_transposed(head_of<Teacher>(p.k_t, b, h), keys, p.d_t, g.ldk, ws.keys_t_t.data());
  for (int64_t i0 = first; i0 < last; i0 += kBlockRows) {
    const int64_t n = std::min(kBlockRows, last - i0);
    const int64_t cols = round_up(std::max<int64_t>(0, g.key_end(i0 + n - 1)), kLanes);
    if (cols > 0) block_scores<Student, Teacher>(g, b, h, i0, n, cols, ws);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = i0 + r, out = g.row_index(b, h, i);
      const int64_t row_keys = std::max<int64_t>(0, g.key_end(i));
      float* s_s = ws.scores_s.data() + r * g.ldk;
      float* s_t = ws.scores_t.data() + r * g.ldk;
      drop_masked_keys(s_s, row_keys, keep);
      drop_masked_keys(s_t, row_keys, keep);
      const float max_s = row_max(s_s, row_keys), max_t = row_max(s_t, row_keys);
      // No visible key, or a padded position. (Teacher scores all -inf where the student's are not give
      // kl = nan below, as a nan score does.)
      if ((max_s == -INFINITY && max_t == -INFINITY) || !g.row_kept(keep, i)) {
        p.kl[out] = 0.0f;
        p.lse_s[out] = p.lse_t[out] = -INFINITY;
        continue;
      }
      // Log-softmaxes as (s - max) - log Z (exact near the max), Z summed in double; A_t = e_t / Z_t.
      float* e_t = ws.exp_t.data();
      double z_s = 0.0, z_t = 0.0;
#pragma omp simd reduction(+ : z_s, z_t)
      for (int64_t j = 0; j < row_keys; ++j) {
        z_s += fast_exp(s_s[j] - max_s);
        e_t[j] = fast_exp(s_t[j] - max_t);
        z_t += e_t[j];
      }
      const float log_z_s = float(std::log(z_s)), log_z_t = float(std::log(z_t)), inv_z_t = float(1.0 / z_t);
      double kl = 0.0;
#pragma omp simd reduction(+ : kl)
      for (int64_t j = 0; j < row_keys; ++j)
        kl += xlog_ratio(e_t[j] * inv_z_t, half_log_prob(s_t[j], max_t, log_z_t), half_log_prob(s_s[j], max_s, log_z_s));
      p.kl[out] = float(kl);
      p.lse_s[out] = max_s + log_z_s;
      p.lse_t[out] = max_t + log_z_t;
    }
  }
}

// Backward of query rows [first, last) of head (b, h): their dq_s rows, and their share of dk_s added to
// grad_k (fp32, ldk x ld_ds).
template <class Student, class Teacher>
TSA_CPU_CLONES void backward_rows(const Geometry& g, int64_t b, int64_t h, int64_t first, int64_t last, float* grad_k,
                                  Workspace& ws) {
  const AttentionTransferParams& p = g.p;
  const uint8_t* keep = g.keep(b);
  const Head<Student> dq = head_of<Student>(p.dq_s, b, h);
  load_transposed(head_of<Student>(p.k_s, b, h), p.n_k, p.d_s, g.ldk, ws.keys_s_t.data());
  load_transposed(head_of<Teacher>(p.k_t, b, h), p.n_k, p.d_t, g.ldk, ws.keys_t_t.data());
  load_rows(head_of<Student>(p.k_s, b, h), 0, p.n_k, p.d_s, 1.0f, g.ldk, g.ld_ds, ws.keys_s.data());
  // Padded keys (and, below, the queries of rows that do not count) are zeroed: their dS is 0, but 0 * NaN
  // would carry a NaN they hold into dq (and dk).
  if (keep != nullptr)
    for (int64_t j = 0; j < p.n_k; ++j)
      if (keep[j] == 0) std::fill(ws.keys_s.data() + j * g.ld_ds, ws.keys_s.data() + (j + 1) * g.ld_ds, 0.0f);
  for (int64_t i0 = first; i0 < last; i0 += kBlockRows) {
    const int64_t n = std::min(kBlockRows, last - i0);
    const int64_t cols = round_up(std::max<int64_t>(0, g.key_end(i0 + n - 1)), kLanes);
    if (cols == 0) {  // no row of the block sees a key
      for (int64_t r = 0; r < n; ++r) std::fill(dq.row(i0 + r), dq.row(i0 + r) + p.d_s, from_float<Student>(0.0f));
      continue;
    }
    block_scores<Student, Teacher>(g, b, h, i0, n, cols, ws);
    // dS rows in place of the student's scores; rows past n (padding) and rows that do not count are 0.
    for (int64_t r = 0; r < kBlockRows; ++r) {
      float* ds = ws.scores_s.data() + r * g.ldk;
      const int64_t i = i0 + r, stats = g.row_index(b, h, std::min(i, p.n_q - 1));
      const bool counted = r < n && p.lse_s[stats] > -INFINITY;
      const int64_t row_keys = counted ? g.key_end(i) : 0;
      if (counted) {  // masked keys: -inf scores, A = 0, dS = 0
        float* s_t = ws.scores_t.data() + r * g.ldk;
        const float w = p.row_weights[stats], lse_s = p.lse_s[stats], lse_t = p.lse_t[stats];
        drop_masked_keys(ds, row_keys, keep);
        drop_masked_keys(s_t, row_keys, keep);
#pragma omp simd
        for (int64_t j = 0; j < row_keys; ++j) ds[j] = w * (fast_exp(ds[j] - lse_s) - fast_exp(s_t[j] - lse_t));
      }
      std::fill(ds + row_keys, ds + cols, 0.0f);
      if (!counted) std::fill(ws.queries_s.data() + r * g.ld_ds, ws.queries_s.data() + (r + 1) * g.ld_ds, 0.0f);
    }
    // dq = scale_s dS k_s for the block's rows.
    tile_product<false>(ws.scores_s.data(), g.ldk, ws.keys_s.data(), g.ld_ds, cols, kBlockRows, g.ld_ds,
                        ws.grad_q.data(), g.ld_ds);
    store_rows(ws.grad_q.data(), g.ld_ds, n, p.d_s, p.scale_s, dq, i0);
    // dk += dS^T (scale_s q_s): dS transposed, so that the product runs over the block's rows.
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t r = 0; r < kBlockRows; ++r) ws.grad_scores_t[j * kBlockRows + r] = ws.scores_s[r * g.ldk + j];
    tile_product<true>(ws.grad_scores_t.data(), kBlockRows, ws.queries_s.data(), g.ld_ds, kBlockRows, cols, g.ld_ds,
                       grad_k, g.ld_ds);
  }
}

// f(TypeTag<Student>, TypeTag<Teacher>) for the params' dtype codes (unknown codes throw).
template <class F>
void dispatch_models(const AttentionTransferParams& p, F&& f) {
  dispatch_dtype(p.q_s.dtype, [&](auto student) {
    dispatch_dtype(p.q_t.dtype, [&](auto teacher) { f(student, teacher); });
  });
}

}  // namespace

void attention_transfer_forward_cpu(const AttentionTransferParams& params) {
  dispatch_models(params, [&](auto student, auto teacher) {
    using Student = typename decltype(student)::type;
    using Teacher = typename decltype(teacher)::type;
    const Geometry g(params);
    const int64_t chunks = (params.n_q + kChunkRows - 1) / kChunkRows, heads = params.batch * params.heads;
#pragma omp parallel
    {
      Workspace ws(g, false);
#pragma omp for schedule(dynamic)
      for (int64_t item = 0; item < heads * chunks; ++item) {
        const int64_t bh = item / chunks, first = item % chunks * kChunkRows;
        forward_chunk<Student, Teacher>(g, bh / params.heads, bh % params.heads, first,
                                        std::min(params.n_q, first + kChunkRows), ws);
      }
    }
  });
}

void attention_transfer_backward_cpu(const AttentionTransferParams& params) {
  dispatch_models(params, [&](auto student, auto teacher) {
    using Student = typename decltype(student)::type;
    using Teacher = typename decltype(teacher)::type;
    const Geometry g(params);
    const int64_t heads = params.batch * params.heads, grad_k_size = g.ldk * g.ld_ds;
    // A work item is one head, its dk summed in the thread's grad_k and written when the head is done. With
    // fewer heads than threads, an item is one of `splits` parts of a head's query rows (whole blocks), whose
    // share of dk goes to its own buffer in `parts`; the parts of each head are summed at the end.
    const int64_t blocks = (params.n_q + kBlockRows - 1) / kBlockRows;
    const int64_t wanted = std::min(blocks, (max_threads() + heads - 1) / heads);  // parts per head
    const int64_t blocks_per_split = (blocks + wanted - 1) / wanted;
    const int64_t splits = (blocks + blocks_per_split - 1) / blocks_per_split;  // none of them empty
    const int64_t rows_per_split = blocks_per_split * kBlockRows;
    std::vector<float> parts(splits > 1 ? heads * splits * grad_k_size : 0);
#pragma omp parallel
    {
      Workspace ws(g, true, splits == 1);
#pragma omp for schedule(dynamic)
      for (int64_t item = 0; item < heads * splits; ++item) {
        const int64_t b = item / splits / params.heads, h = item / splits % params.heads;
        const int64_t first = item % splits * rows_per_split;
        float* grad_k = splits == 1 ? ws.grad_k.data() : parts.data() + item * grad_k_size;
        std::fill(grad_k, grad_k + grad_k_size, 0.0f);
        backward_rows<Student, Teacher>(g, b, h, first, std::min(params.n_q, first + rows_per_split), grad_k, ws);
        if (splits == 1) {
          store_rows(grad_k, g.ld_ds, params.n_k, params.d_s, 1.0f, head_of<Student>(params.dk_s, b, h), 0);
        }
      }
      if (splits > 1) {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < heads; ++bh) {
          float* sum = parts.data() + bh * splits * grad_k_size;
          for (int64_t part = 1; part < splits; ++part) {
            const float* share = sum + part * grad_k_size;
#pragma omp simd
            for (int64_t e = 0; e < grad_k_size; ++e) sum[e] += share[e];
          }
          store_rows(sum, g.ld_ds, params.n_k, params.d_s, 1.0f,
                     head_of<Student>(params.dk_s, bh / params.heads, bh % params.heads), 0);
        }
      }
    }
  });
}

}  // namespace tsa_fast
