// CUDA kernels behind megatron_r1.ops: per-row online log-sum-exp over a [T, V] logits chunk and its gradient,
// the GRPO per-token policy-loss math with its derivative, and group advantages.
// Math in fp32 whatever the logits dtype; one block per row so each row is read once per pass.
// Per-operator ATen headers instead of <ATen/ATen.h>: a quarter less compile time. c10's stream getter needs no
// cuBLAS/cuSPARSE headers, unlike ATen/cuda/CUDAContext.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <optional>

namespace megatron_r1 {
namespace {

constexpr int kThreads = 256;

// Running (max, Σexp(z−max), Σexp(z−max)·z) over part of a row; merging two parts rescales to the larger max.
struct LseState {
  float m, s, a;
};

__device__ __forceinline__ LseState merge(LseState x, LseState y) {
  const float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return {m, 0.f, 0.f};  // both empty: exp(−inf − −inf) would be NaN
  const float ex = expf(x.m - m), ey = expf(y.m - m);
  return {m, x.s * ex + y.s * ey, x.a * ex + y.a * ey};
}

__device__ __forceinline__ LseState warp_reduce(LseState v) {
  for (int off = 16; off > 0; off >>= 1) {
    LseState o{__shfl_down_sync(0xffffffffu, v.m, off), __shfl_down_sync(0xffffffffu, v.s, off),
               __shfl_down_sync(0xffffffffu, v.a, off)};
    v = merge(v, o);
  }
  return v;
}

// Result valid in thread 0 only.
__device__ LseState block_reduce(LseState v) {
  __shared__ LseState partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < warps ? partial[lane] : LseState{-INFINITY, 0.f, 0.f};
  if (warp == 0) v = warp_reduce(v);
  return v;
}

template <typename scalar_t>
__global__ void lse_fwd_kernel(const scalar_t* __restrict__ x, int64_t stride, const int64_t* __restrict__ tokens,
                               float* __restrict__ lse, float* __restrict__ tgt, float* __restrict__ ez,
                               int64_t vocab_start, int64_t V, float inv_temp, bool want_ent) {
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * stride;
  LseState st{-INFINITY, 0.f, 0.f};
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const float z = static_cast<float>(xr[c]) * inv_temp;
    if (z == -INFINITY) continue;  // a masked-out vocabulary entry contributes nothing
    if (z > st.m) {
      const float r = expf(st.m - z);
      st = {z, st.s * r + 1.f, st.a * r + z};
    } else {
      const float e = expf(z - st.m);
      st.s += e;
      st.a += e * z;
    }
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    lse[row] = st.m + logf(st.s);
    if (want_ent) ez[row] = st.a / st.s;
    const int64_t local = tokens[row] - vocab_start;
    const bool in_shard = local >= 0 && local < V;
    tgt[row] = in_shard ? static_cast<float>(xr[local]) * inv_temp : 0.f;
  }
}

// out may alias x: every element is read before the same thread writes it.
template <typename scalar_t>
__global__ void lse_bwd_kernel(const scalar_t* x, int64_t stride_x, scalar_t* out, int64_t stride_out,
                               const int64_t* __restrict__ tokens, const float* __restrict__ lse,
                               const float* __restrict__ ent, const float* __restrict__ g_lp,
                               const float* __restrict__ g_ent, int64_t vocab_start, int64_t V, float inv_temp) {
  const int64_t row = blockIdx.x;
  const float l = lse[row], glp = g_lp[row];
  const float h = ent ? ent[row] : 0.f, gent = g_ent ? g_ent[row] : 0.f;
  const int64_t local = tokens[row] - vocab_start;
  const scalar_t* xr = x + row * stride_x;
  scalar_t* outr = out + row * stride_out;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const float logp = static_cast<float>(xr[c]) * inv_temp - l;
    const float p = expf(logp);
    // d log p_target / dz = onehot − p;  dH/dz = −p (log p + H)
    float g = -p * (glp + gent * (logp + h));
    if (c == local) g += glp;
    outr[c] = static_cast<scalar_t>(g * inv_temp);
  }
}

// Token-level GRPO loss: writes each token's weighted loss and d(weighted loss)/d logp.
__global__ void policy_loss_kernel(int64_t n, const float* __restrict__ logp, const float* __restrict__ old,
                                   const float* __restrict__ adv, const bool* __restrict__ mask,
                                   const float* __restrict__ weight, const float* __restrict__ ref,
                                   const float* __restrict__ tis, float clip_low, float clip_high, float kl_coef,
                                   int kl_estimator, float* __restrict__ loss, float* __restrict__ ratio_out,
                                   float* __restrict__ kl_out, float* __restrict__ grad) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool m = mask[i];
    const float lp = logp[i];
    // padding may hold anything; exp() of it must not turn into inf·0 = NaN
    const float ratio = expf(m ? lp - old[i] : 0.f);
    const float a = adv[i];
    const float clipped = fminf(fmaxf(ratio, 1.f - clip_low), 1.f + clip_high);
    const float unclipped_obj = ratio * a, clipped_obj = clipped * a;
    float l = -fminf(unclipped_obj, clipped_obj);
    // when the clipped branch is strictly smaller the clamp is saturated, so its gradient is zero
    float g = unclipped_obj <= clipped_obj ? -a * ratio : 0.f;
    float kl = 0.f;
    if (ref != nullptr) {
      const float d = m ? lp - ref[i] : 0.f;
      float dkl;
      if (kl_estimator == 1) {
        kl = d;
        dkl = 1.f;
      } else if (kl_estimator == 2) {
        kl = 0.5f * d * d;
        dkl = d;
      } else {
        const float e = expf(-d);
        kl = e + d - 1.f;
        dkl = 1.f - e;
      }
      l += kl_coef * kl;
      g += kl_coef * dkl;
    }
    const float w = m ? weight[i] * (tis != nullptr ? tis[i] : 1.f) : 0.f;
    loss[i] = m ? w * l : 0.f;
    grad[i] = w * g;
    ratio_out[i] = ratio;
    kl_out[i] = kl;
  }
}

// One warp per group: G is usually 8–64, so a block per group would idle most of its threads.
template <typename scalar_t>
__global__ void group_adv_kernel(const scalar_t* __restrict__ r, float* __restrict__ out, int64_t groups,
                                 int64_t G, float eps, bool use_std) {
  const int64_t grp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (grp >= groups) return;  // uniform across the warp
  const scalar_t* rg = r + grp * G;
  float sum = 0.f;
  for (int64_t i = lane; i < G; i += 32) sum += static_cast<float>(rg[i]);
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float mean = sum / G;
  float denom = 1.f;
  if (use_std) {
    float sq = 0.f;
    for (int64_t i = lane; i < G; i += 32) {
      const float d = static_cast<float>(rg[i]) - mean;
      sq += d * d;
    }
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    denom = sqrtf(sq / G) + eps;
  }
  for (int64_t i = lane; i < G; i += 32) out[grp * G + i] = (static_cast<float>(rg[i]) - mean) / denom;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "megatron_r1 CUDA ops: ", name, " must be a CUDA tensor, got ", t.device());
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace

std::vector<at::Tensor> lse_forward(const at::Tensor& x, const at::Tensor& tokens, int64_t vocab_start,
                                    double inv_temp, bool want_ent) {
  check_cuda(x, "logits");
  check_cuda(tokens, "tokens");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "logits must be a row-major [T, V] matrix");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.numel() == x.size(0), "tokens must be int64 [T]");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto rows = x.size(0);
  auto opts = x.options().dtype(at::kFloat);
  auto lse = at::empty({rows}, opts), tgt = at::empty({rows}, opts);
  auto ez = want_ent ? at::empty({rows}, opts) : lse;
  auto tok = tokens.contiguous();
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lse_forward", [&] {
      lse_fwd_kernel<scalar_t><<<rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), x.stride(0), tok.data_ptr<int64_t>(), lse.data_ptr<float>(),
          tgt.data_ptr<float>(), ez.data_ptr<float>(), vocab_start, x.size(1), static_cast<float>(inv_temp),
          want_ent);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {lse, tgt, ez};
}

void lse_backward(const at::Tensor& x, at::Tensor& out, const at::Tensor& tokens, const at::Tensor& lse,
                  const std::optional<at::Tensor>& ent, const at::Tensor& g_lp,
                  const std::optional<at::Tensor>& g_ent, int64_t vocab_start, double inv_temp) {
  check_cuda(x, "logits");
  check_cuda(out, "out");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.stride(1) == 1, "logits and out must be row-major [T, V]");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "out must match logits");
  TORCH_CHECK(ent.has_value() == g_ent.has_value(), "entropy and its gradient come together");
  for (const at::Tensor* t : {&lse, &g_lp}) TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                                                         "statistics must be contiguous fp32");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto rows = x.size(0);
  auto tok = tokens.contiguous();
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lse_backward", [&] {
    lse_bwd_kernel<scalar_t><<<rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), x.stride(0), out.data_ptr<scalar_t>(), out.stride(0), tok.data_ptr<int64_t>(),
        lse.data_ptr<float>(), opt_ptr(ent), g_lp.data_ptr<float>(), opt_ptr(g_ent), vocab_start, x.size(1),
        static_cast<float>(inv_temp));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> policy_loss_forward(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                                            const at::Tensor& mask, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& ref,
                                            const std::optional<at::Tensor>& tis, double clip_low, double clip_high,
                                            double kl_coef, int64_t kl_estimator) {
  check_cuda(logp, "logprobs");
  const int64_t n = logp.numel();
  for (const at::Tensor* t : {&logp, &old, &adv, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n && t->is_cuda(),
                "per-token inputs must be contiguous fp32 CUDA tensors of one size");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == n, "mask must be bool");
  TORCH_CHECK(kl_estimator >= 1 && kl_estimator <= 3, "kl_estimator must be 1, 2 or 3 (k1, k2, k3)");
  const c10::cuda::CUDAGuard guard(logp.device());
  auto loss = at::empty_like(logp), ratio = at::empty_like(logp), kl = at::empty_like(logp),
       grad = at::empty_like(logp);
  if (n == 0) return {loss, ratio, kl, grad};
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  policy_loss_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      n, logp.data_ptr<float>(), old.data_ptr<float>(), adv.data_ptr<float>(), mask.data_ptr<bool>(),
      weight.data_ptr<float>(), opt_ptr(ref), opt_ptr(tis), static_cast<float>(clip_low),
      static_cast<float>(clip_high), static_cast<float>(kl_coef), static_cast<int>(kl_estimator),
      loss.data_ptr<float>(), ratio.data_ptr<float>(), kl.data_ptr<float>(), grad.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, ratio, kl, grad};
}

at::Tensor group_advantages(const at::Tensor& rewards, int64_t group_size, bool use_std, double eps) {
  check_cuda(rewards, "rewards");
  TORCH_CHECK(group_size > 0 && rewards.numel() % group_size == 0, rewards.numel(),
              " rewards do not split into groups of ", group_size);
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.contiguous().view({-1});
  auto out = at::empty(r.sizes(), r.options().dtype(at::kFloat));
  const int64_t groups = r.numel() / group_size;
  if (groups == 0) return out;
  const int64_t threads = static_cast<int64_t>(groups) * 32;
  const int blocks = static_cast<int>((threads + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "group_advantages", [&] {
    group_adv_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        r.data_ptr<scalar_t>(), out.data_ptr<float>(), groups, group_size, static_cast<float>(eps), use_std);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace megatron_r1
