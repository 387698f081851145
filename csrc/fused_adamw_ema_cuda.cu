// CUDA kernel for the fused AdamW + EMA step, multi-tensor-apply style: the host packs pointers of
// up to kMaxTensors tensors and a (tensor, chunk) pair per block into one kernel argument, so a
// model's few hundred parameters take a handful of launches instead of one each.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "fused_adamw_ema.h"

namespace soflow {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kMaxTensors = 36;    // keeps TensorListMeta + scalars under the 4 KiB argument limit
constexpr int kMaxBlocks = 320;

struct TensorListMeta {
  void* ptrs[5][kMaxTensors];  // p, g, m, v, e
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta) + sizeof(AdamWEMAScalars) <= 4096, "kernel argument too big");

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ bool aligned4(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (4 * sizeof(T)) == 0;
}

template <typename grad_t>
__global__ void __launch_bounds__(kThreads)
    adamw_ema_kernel(const TensorListMeta meta, const AdamWEMAScalars s) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, meta.numel[t] - start);
  float* __restrict__ p = static_cast<float*>(meta.ptrs[0][t]) + start;
  const grad_t* __restrict__ g = static_cast<const grad_t*>(meta.ptrs[1][t]) + start;
  float* __restrict__ m = static_cast<float*>(meta.ptrs[2][t]) + start;
  float* __restrict__ v = static_cast<float*>(meta.ptrs[3][t]) + start;
  float* __restrict__ e = static_cast<float*>(meta.ptrs[4][t]) + start;

  int64_t done = 0;
  if (aligned4<float>(p) && aligned4<grad_t>(g) && aligned4<float>(m) && aligned4<float>(v) &&
      aligned4<float>(e)) {
    // 16-byte loads and stores of p, m, v, e (8 bytes for 16-bit grads), four elements a thread.
    const int64_t nvec = n / 4;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      Vec4<float> pv = reinterpret_cast<const Vec4<float>*>(p)[i];
      const Vec4<grad_t> gv = reinterpret_cast<const Vec4<grad_t>*>(g)[i];
      Vec4<float> mv = reinterpret_cast<const Vec4<float>*>(m)[i];
      Vec4<float> vv = reinterpret_cast<const Vec4<float>*>(v)[i];
      Vec4<float> ev = reinterpret_cast<const Vec4<float>*>(e)[i];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        adamw_ema_element(pv.v[j], static_cast<float>(gv.v[j]), mv.v[j], vv.v[j], ev.v[j], s);
      }
      reinterpret_cast<Vec4<float>*>(p)[i] = pv;
      reinterpret_cast<Vec4<float>*>(m)[i] = mv;
      reinterpret_cast<Vec4<float>*>(v)[i] = vv;
      reinterpret_cast<Vec4<float>*>(e)[i] = ev;
    }
    done = nvec * 4;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {  // tail, or unaligned views
    float pi = p[i], mi = m[i], vi = v[i], ei = e[i];
    adamw_ema_element(pi, static_cast<float>(g[i]), mi, vi, ei, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    e[i] = ei;
  }
}

template <typename grad_t>
void launch_all(const AdamWEMATensors& t, const AdamWEMAScalars& s) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TensorListMeta meta;
  int nt = 0, nb = 0;
  const auto launch = [&]() {
    adamw_ema_kernel<grad_t><<<nb, kThreads, 0, stream>>>(meta, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  for (size_t i = 0; i < t.params.size(); ++i) {
    const int64_t numel = t.params[i].numel();
    if (numel == 0) continue;
    meta.ptrs[0][nt] = t.params[i].data_ptr();
    meta.ptrs[1][nt] = t.grads[i].data_ptr();
    meta.ptrs[2][nt] = t.exp_avgs[i].data_ptr();
    meta.ptrs[3][nt] = t.exp_avg_sqs[i].data_ptr();
    meta.ptrs[4][nt] = t.emas[i].data_ptr();
    meta.numel[nt] = numel;
    ++nt;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= INT32_MAX, "fused_adamw_ema_: tensor too large");
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == kMaxTensors && last_chunk)) {
        launch();
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
          for (int k = 0; k < 5; ++k) meta.ptrs[k][0] = meta.ptrs[k][nt - 1];
          meta.numel[0] = meta.numel[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) launch();
}

}  // namespace

void fused_adamw_ema_cuda(const AdamWEMATensors& t, const AdamWEMAScalars& s) {
  const c10::cuda::CUDAGuard guard(t.params[0].device());
  switch (t.grads[0].scalar_type()) {
    case at::kFloat: launch_all<float>(t, s); break;
    case at::kHalf: launch_all<at::Half>(t, s); break;
    case at::kBFloat16: launch_all<at::BFloat16>(t, s); break;
    default: TORCH_CHECK(false, "fused_adamw_ema_: unsupported grad dtype ", t.grads[0].scalar_type());
  }
}

}  // namespace soflow
