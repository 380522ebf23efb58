// The grad_out contract of the cross-entropy kernels, checked the same way by the CPU (csrc/cpu/cross_entropy.cpp)
// and the CUDA (csrc/cuda/cross_entropy.cu) implementations of one schema (csrc/schemas.cpp).
//
// grad_out, when given, is where the gradient goes instead of a new buffer: a contiguous tensor of logits'
// shape, dtype and device. It may be the logits themselves (every kernel reads an element before it stores
// that element's gradient), but then exactly them: a partial overlap would overwrite logits not yet read.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fastft {

inline void check_grad_out(const at::Tensor& logits, const at::Tensor& grad_out, const char* op) {
  TORCH_CHECK(grad_out.sizes() == logits.sizes() && grad_out.scalar_type() == logits.scalar_type() &&
                  grad_out.is_contiguous() && grad_out.device() == logits.device(),
              op, ": grad_out must be a contiguous ", logits.scalar_type(), " tensor of logits' shape ", logits.sizes());
  if (grad_out.is_alias_of(logits)) {
    TORCH_CHECK(grad_out.data_ptr() == logits.data_ptr() && logits.is_contiguous(), op,
                ": grad_out shares logits' storage, so it must be exactly the (contiguous) logits");
  }
}

}  // namespace fastft
