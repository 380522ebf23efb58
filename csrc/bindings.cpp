// The Python module fastft._C. Kernels register themselves with torch.library
// (schemas: TORCH_LIBRARY in csrc/schemas.cpp; TORCH_LIBRARY_IMPL in each kernel file); importing this module
// loads those registrations. It also reports what was compiled in, for `python -m fastft info`.
#include <torch/extension.h>

#include "cpu/_buffer_cache.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastft C++/CUDA kernels (registered as torch.ops.fastft.*)";
  m.def("release_buffer_cache", &fastft::release_buffer_cache, "Free the cached CPU output buffers");
#ifdef FASTFT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#if defined(CPU_CAPABILITY_AVX512)
  m.attr("cpu_capability") = "avx512";
#elif defined(__AVX512F__)
  m.attr("cpu_capability") = "avx512";
#elif defined(__AVX2__)
  m.attr("cpu_capability") = "avx2";
#else
  m.attr("cpu_capability") = "default";
#endif
}
