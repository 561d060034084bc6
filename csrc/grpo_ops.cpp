// Python bindings for the kernels in grpo_ops_kernels.cu (built by megatron_r1/ops/cuda_ext.py).
// The tensor type and torch's pybind11 casters only: <torch/extension.h> would parse all of libtorch's API and
// triple this file's compile time.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

namespace megatron_r1 {
std::vector<at::Tensor> lse_forward(const at::Tensor& x, const at::Tensor& tokens, int64_t vocab_start,
                                    double inv_temp, bool want_ent);
void lse_backward(const at::Tensor& x, at::Tensor& out, const at::Tensor& tokens, const at::Tensor& lse,
                  const std::optional<at::Tensor>& ent, const at::Tensor& g_lp,
                  const std::optional<at::Tensor>& g_ent, int64_t vocab_start, double inv_temp);
std::vector<at::Tensor> policy_loss_forward(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                                            const at::Tensor& mask, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& ref,
                                            const std::optional<at::Tensor>& tis, double clip_low, double clip_high,
                                            double kl_coef, int64_t kl_estimator);
at::Tensor group_advantages(const at::Tensor& rewards, int64_t group_size, bool use_std, double eps);
}  // namespace megatron_r1

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-r1 fused GRPO ops (CUDA)";
  m.def("lse_forward", &megatron_r1::lse_forward,
        "Per-row (lse, target logit, E[z]) of z = logits * inv_temp over a [T, V_local] chunk",
        py::arg("logits"), py::arg("tokens"), py::arg("vocab_start"), py::arg("inv_temp"), py::arg("want_ent"));
  m.def("lse_backward", &megatron_r1::lse_backward, "Gradient w.r.t. the logits chunk, written into out",
        py::arg("logits"), py::arg("out"), py::arg("tokens"), py::arg("lse"), py::arg("ent"), py::arg("g_lp"),
        py::arg("g_ent"), py::arg("vocab_start"), py::arg("inv_temp"));
  m.def("policy_loss_forward", &megatron_r1::policy_loss_forward,
        "Token-level GRPO loss: (weighted loss, ratio, kl, d weighted loss / d logp) per token",
        py::arg("logp"), py::arg("old"), py::arg("adv"), py::arg("mask"), py::arg("weight"), py::arg("ref"),
        py::arg("tis"), py::arg("clip_low"), py::arg("clip_high"), py::arg("kl_coef"), py::arg("kl_estimator"));
  m.def("group_advantages", &megatron_r1::group_advantages, "Group-normalized advantages", py::arg("rewards"),
        py::arg("group_size"), py::arg("use_std"), py::arg("eps"));
}
