// Fused AdamW + EMA: the per-element math shared by the CPU and CUDA kernels.
//
// One pass reads p, g, m, v, e once and writes p, m, v, e once. The order of operations follows
// torch.optim.AdamW (non-amsgrad, non-maximize), then the EMA of the updated parameter:
//   p *= 1 - lr*wd
//   m  = b1*m + (1-b1)*g
//   v  = b2*v + (1-b2)*g*g
//   p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),   bc1 = 1-b1^k, bc2 = 1-b2^k
//   e  = d*e + (1-d)*p
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#if defined(__CUDACC__)
#define SOFLOW_HD __host__ __device__ __forceinline__
#else
#define SOFLOW_HD inline
#endif

namespace soflow {

// Step-dependent constants, computed once per launch in double and rounded to fp32, as torch does
// when it passes Python floats to fp32 tensor ops.
struct AdamWEMAScalars {
  float decay_scale;  // 1 - lr*wd
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float step_size;  // lr / bc1
  float bc2_sqrt;   // sqrt(bc2)
  float eps;
  float ema_decay, one_minus_ema_decay;
};

SOFLOW_HD void adamw_ema_element(float& p, float g, float& m, float& v, float& e,
                                 const AdamWEMAScalars& s) {
  p = p * s.decay_scale;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p - s.step_size * (m / denom);
  e = s.ema_decay * e + s.one_minus_ema_decay * p;
}

// Lists of equal length; every tensor contiguous and on one device, grads of one dtype.
struct AdamWEMATensors {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, emas;
};

#ifdef WITH_CUDA
void fused_adamw_ema_cuda(const AdamWEMATensors& t, const AdamWEMAScalars& s);
#endif

}  // namespace soflow
