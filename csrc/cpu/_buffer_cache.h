// A one-buffer-per-key cache for large CPU outputs (gradients of [tokens x vocab] logits).
//
// Why: a fresh 500 MB CPU tensor is ~130k first-touch page faults, which on a small machine cost
// more than the kernel that fills it. Like CUDA's caching allocator, but for a handful of buffers:
// a cached buffer is handed out again only when nothing else references its storage any more (the
// previous step's gradient was consumed and dropped); otherwise a fresh tensor is allocated.
// FASTFT_CPU_BUFFER_CACHE=0 disables it; fastft._C.release_buffer_cache() frees what it holds.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

namespace fastft {

struct BufferCache {
  std::mutex mu;
  std::unordered_map<std::string, at::Tensor> slots;  // byte tensors

  static BufferCache& instance() {
    static BufferCache cache;
    return cache;
  }

  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("FASTFT_CPU_BUFFER_CACHE");
      return v == nullptr || std::strcmp(v, "0") != 0;
    }();
    return on;
  }
};

// An uninitialized tensor of `sizes` and `opts` (contiguous, CPU), reusing the cached storage of
// slot `key` when it is free and large enough.
inline at::Tensor cached_empty(const std::string& key, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!BufferCache::enabled() || opts.device().type() != at::kCPU) return at::empty(sizes, opts);
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  auto& cache = BufferCache::instance();
  std::lock_guard<std::mutex> lock(cache.mu);
  at::Tensor& slot = cache.slots[key];
  const bool free = slot.defined() && slot.storage().use_count() == 1 && slot.use_count() == 1;
  if (!free || slot.numel() < nbytes) {
    if (slot.defined() && !free) return at::empty(sizes, opts);  // still in use: don't wait, don't steal
    slot = at::empty({nbytes}, opts.dtype(at::kByte));
  }
  return slot.narrow(0, 0, nbytes).view(c10::typeMetaToScalarType(opts.dtype())).view(sizes);
}

inline void release_buffer_cache() {
  auto& cache = BufferCache::instance();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.slots.clear();
}

}  // namespace fastft
