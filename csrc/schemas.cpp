// Every fastft kernel's schema, declared once and for every device. csrc/cpu/*.cpp and csrc/cuda/*.cu only
// register implementations (TORCH_LIBRARY_IMPL) under these names, so editing a CPU file cannot change what
// the CUDA files must match, and the CPU-only and the CUDA build load the same op table.
// Contracts and math: each op's kernel files and fastft/ops/<op>.py. Python-side ops (fastft::<op>, the
// differentiable ones of fastft.ops) are torch.library.custom_op fragments added to this namespace at import.
#include <torch/library.h>

TORCH_LIBRARY(fastft, m) {
  // cross-entropy (csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu). grad_out: the gradient's buffer
  // (it may be the logits themselves), so the third output / the result is then an empty tensor.
  m.def(
      "cross_entropy_fwd_kernel(Tensor logits, Tensor target, Tensor? weight, Tensor? grad_scale, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, Tensor(a!)? grad_out=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_bwd_kernel(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, Tensor(a!)? grad_out=None) -> Tensor");
  m.def("scale_if_not_one_kernel_(Tensor(a!) grad, Tensor scale) -> ()");

  // full KL and selective log-softmax (csrc/cpu/kl.cpp, csrc/cuda/kl.cu). full_kl's row loss is
  // (1 - reverse_weight) KL(pi || rho) + reverse_weight KL(rho || pi); outputs (kl, lse_p, lse_r, kl_rev, grad_policy,
  // grad_ref) with kl = KL(pi || rho) and kl_rev = KL(rho || pi) (empty when reverse_weight == 0).
  m.def(
      "full_kl_fwd_kernel(Tensor policy_logits, Tensor ref_logits, Tensor? mask, Tensor? grad_scale, "
      "float temperature, bool grad_policy, bool grad_ref, float reverse_weight=0.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "full_kl_bwd_kernel(Tensor grad_kl, Tensor policy_logits, Tensor ref_logits, Tensor? mask, Tensor lse_p, "
      "Tensor lse_r, Tensor kl, float temperature, bool grad_policy, bool grad_ref, Tensor? kl_rev=None, "
      "float reverse_weight=0.0) -> (Tensor, Tensor)");
  // selective log-softmax + entropy: rows whose index is ignore_index give 0s and a zero gradient row;
  // grad_out as cross-entropy's (it may be the logits; the result is then an empty tensor).
  m.def(
      "selective_log_softmax_fwd_kernel(Tensor logits, Tensor index, float temperature, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "selective_log_softmax_bwd_kernel(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor index, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index, Tensor(a!)? grad_out=None) -> Tensor");

  // LoRA linear (csrc/cpu/lora.cpp, csrc/cuda/lora.cu)
  m.def(
      "lora_linear_fwd_kernel(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_bwd_kernel(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
      "Tensor? seed, float scaling, float dropout_p, bool need_dx, bool need_dweight, bool need_dbias, bool need_dA, "
      "bool need_dB) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_dropout_mask_kernel(Tensor like, float dropout_p, Tensor seed) -> Tensor");

  // bottleneck adapter block (csrc/cpu/adapter.cpp, csrc/cuda/adapter.cu)
  m.def(
      "adapter_fwd_kernel(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor? up_bias, "
      "Tensor seed, int activation, int drop_threshold, float scale) -> (Tensor, Tensor)");
  m.def(
      "adapter_bwd_kernel(Tensor grad, Tensor x, Tensor down_weight, Tensor up_weight, Tensor pre, Tensor seed, "
      "int activation, int drop_threshold, float scale, bool has_down_bias, bool has_up_bias, bool need_input, "
      "bool need_down, bool need_up) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // RMSNorm (csrc/cpu/rms_norm.cpp, csrc/cuda/rms_norm.cu)
  m.def("rms_norm_fwd_kernel(Tensor x, Tensor weight, float eps, float offset, bool gemma) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_bwd_kernel(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, float offset, bool gemma, "
      "bool need_input, bool need_weight) -> (Tensor, Tensor)");

  // SwiGLU (csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu)
  m.def("swiglu_fwd_kernel(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd_kernel(Tensor grad_out, Tensor gate, Tensor up, bool need_gate, bool need_up) -> (Tensor, Tensor)");
}
