// soflow_fast._fused_optim: the Python binding, argument checks and the CPU kernel.
// The CUDA kernel lives in fused_adamw_ema_cuda.cu and is compiled only with a CUDA build of torch.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "fused_adamw_ema.h"

namespace soflow {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel_for task: enough work to hide the fork

// Separate function so that the __restrict__ promises reach the loop: without them GCC must
// version the loop for 5-way aliasing and gives up vectorizing it (3x slower with fp32 grads).
template <typename grad_t>
void adamw_ema_cpu_range(float* __restrict__ p, const grad_t* __restrict__ g, float* __restrict__ m,
                         float* __restrict__ v, float* __restrict__ e, int64_t n,
                         const AdamWEMAScalars s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float pi = p[i], mi = m[i], vi = v[i], ei = e[i];
    adamw_ema_element(pi, static_cast<float>(g[i]), mi, vi, ei, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    e[i] = ei;
  }
}

template <typename grad_t>
void adamw_ema_cpu_tensor(float* p, const grad_t* g, float* m, float* v, float* e, int64_t n,
                          const AdamWEMAScalars& s) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    adamw_ema_cpu_range<grad_t>(p + begin, g + begin, m + begin, v + begin, e + begin, end - begin, s);
  });
}

template <typename grad_t>
void adamw_ema_cpu(const AdamWEMATensors& t, const AdamWEMAScalars& s) {
  for (size_t i = 0; i < t.params.size(); ++i) {
    adamw_ema_cpu_tensor<grad_t>(t.params[i].data_ptr<float>(), t.grads[i].data_ptr<grad_t>(),
                                 t.exp_avgs[i].data_ptr<float>(), t.exp_avg_sqs[i].data_ptr<float>(),
                                 t.emas[i].data_ptr<float>(), t.params[i].numel(), s);
  }
}

void check_tensors(const AdamWEMATensors& t) {
  const size_t n = t.params.size();
  TORCH_CHECK(t.grads.size() == n && t.exp_avgs.size() == n && t.exp_avg_sqs.size() == n &&
                  t.emas.size() == n,
              "fused_adamw_ema_: all five tensor lists must have the same length");
  if (n == 0) return;
  const auto device = t.params[0].device();
  const auto grad_dtype = t.grads[0].scalar_type();
  TORCH_CHECK(grad_dtype == at::kFloat || grad_dtype == at::kHalf || grad_dtype == at::kBFloat16,
              "fused_adamw_ema_: grads must be float32, float16 or bfloat16, got ", grad_dtype);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = t.params[i].numel();
    for (const at::Tensor* x : {&t.params[i], &t.exp_avgs[i], &t.exp_avg_sqs[i], &t.emas[i]}) {
      TORCH_CHECK(x->scalar_type() == at::kFloat,
                  "fused_adamw_ema_: params, moments and EMA must be float32, got ", x->scalar_type());
    }
    for (const at::Tensor* x :
         {&t.params[i], &t.grads[i], &t.exp_avgs[i], &t.exp_avg_sqs[i], &t.emas[i]}) {
      TORCH_CHECK(x->device() == device, "fused_adamw_ema_: all tensors must be on ", device,
                  ", got one on ", x->device());
      TORCH_CHECK(x->layout() == at::kStrided && x->is_contiguous(),
                  "fused_adamw_ema_: all tensors must be dense and contiguous");
      TORCH_CHECK(x->numel() == numel, "fused_adamw_ema_: tensor ", i,
                  " has mismatched sizes across the lists");
    }
    TORCH_CHECK(t.grads[i].scalar_type() == grad_dtype,
                "fused_adamw_ema_: all grads in one call must share a dtype");
  }
}

}  // namespace

// One AdamW step (step = k, 1-based, already incremented) and one EMA update, in place.
void fused_adamw_ema_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                      std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                      std::vector<at::Tensor> emas, int64_t step, double lr, double beta1,
                      double beta2, double eps, double weight_decay, double ema_decay) {
  TORCH_CHECK(step >= 1, "fused_adamw_ema_: step must be >= 1 (1-based, after increment)");
  for (auto& g : grads) g = g.contiguous();  // a no-op for the usual dense grad
  const AdamWEMATensors t{std::move(params), std::move(grads), std::move(exp_avgs),
                          std::move(exp_avg_sqs), std::move(emas)};
  check_tensors(t);
  if (t.params.empty()) return;

  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const AdamWEMAScalars s{
      static_cast<float>(1.0 - lr * weight_decay),
      static_cast<float>(beta1),
      static_cast<float>(1.0 - beta1),
      static_cast<float>(beta2),
      static_cast<float>(1.0 - beta2),
      static_cast<float>(lr / bc1),
      static_cast<float>(std::sqrt(bc2)),
      static_cast<float>(eps),
      static_cast<float>(ema_decay),
      static_cast<float>(1.0 - ema_decay),
  };

  if (t.params[0].is_cuda()) {
#ifdef WITH_CUDA
    fused_adamw_ema_cuda(t, s);
    return;
#else
    TORCH_CHECK(false, "fused_adamw_ema_: soflow_fast._fused_optim was built without CUDA; "
                "rebuild with a CUDA build of torch and nvcc on the PATH");
#endif
  }
  TORCH_CHECK(t.params[0].is_cpu(), "fused_adamw_ema_: unsupported device ", t.params[0].device());
  switch (t.grads[0].scalar_type()) {
    case at::kFloat: adamw_ema_cpu<float>(t, s); break;
    case at::kHalf: adamw_ema_cpu<at::Half>(t, s); break;
    case at::kBFloat16: adamw_ema_cpu<at::BFloat16>(t, s); break;
    default: TORCH_CHECK(false, "unreachable");
  }
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace soflow

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused AdamW + EMA optimizer step (one pass over p, g, m, v, ema)";
  m.def("fused_adamw_ema_", &soflow::fused_adamw_ema_, "In-place fused AdamW step + EMA update",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("emas"), py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("ema_decay"),
        py::call_guard<py::gil_scoped_release>());
  m.def("has_cuda", &soflow::has_cuda, "Whether the CUDA kernel was compiled in");
}
