// attention_transfer_loss.h: the contract of the CPU kernels of the attention-transfer loss
// (attention_transfer_loss_cpu.cpp), the same as the Triton kernels' (kernels/attention_transfer_loss.py).
//
// Per (batch b, head h, query row i), s_ij = scale * q_i . k_j over the visible keys j (kept by the mask,
// and j <= i + N_k - N_q when causal), lse_i = log sum_j exp(s_ij), A_ij = exp(s_ij - lse_i):
//   forward   kl_i = KL(A_t,i || A_s,i), lse_s,i, lse_t,i; a row that does not count writes kl = 0 and
//             lse = -inf. A row counts when it has a visible key and, in self-attention (N_q == N_k),
//             its own position is kept by the mask.
//   backward  dq_s, dk_s: the gradient of sum_i w_i kl_i, from dS_ij = w_i (A_s,ij - A_t,ij):
//             dq_s = scale_s dS k_s, dk_s = scale_s dS^T q_s (scores recomputed, A from the stored lse).
#pragma once

#include <cstdint>

namespace tsa_fast {

// A (B, H, N, D) tensor, fp32/fp16/bf16 (DTypeCode), strides in elements, the last (D) stride 1.
struct HeadTensor {
  void* data;
  int dtype;
  int64_t stride_b, stride_h, stride_n;
};

struct AttentionTransferParams {
  HeadTensor q_s, k_s;  // student: (B, H, N_q, D_s), (B, H, N_k, D_s), one dtype
  HeadTensor q_t, k_t;  // teacher: (B, H, N_q, D_t), (B, H, N_k, D_t), one dtype
  const uint8_t* key_padding_mask;  // (B, N_k) bool (1 = keep), column stride 1, or null: every key kept
  int64_t mask_stride_b;
  int64_t batch, heads, n_q, n_k, d_s, d_t;
  float scale_s, scale_t;
  bool causal;
  float* kl;     // (B, H, N_q) contiguous: forward out
  float* lse_s;  // (B, H, N_q) contiguous: forward out, backward in
  float* lse_t;
  const float* row_weights;  // (B, H, N_q) contiguous: backward in (w)
  HeadTensor dq_s, dk_s;     // backward out, shaped and typed as q_s, k_s
};

void attention_transfer_forward_cpu(const AttentionTransferParams& params);
void attention_transfer_backward_cpu(const AttentionTransferParams& params);

}  // namespace tsa_fast
