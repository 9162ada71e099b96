// The CPU ops' buffer cache (declared and motivated in host_cache.h).

#include "host_cache.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace hmlstm {
namespace {

// Smaller buffers come from malloc's heap, which reuses them already.
constexpr size_t kCachedMinBytes = size_t(1) << 20;
constexpr size_t kAlignment = 64;  // as c10's CPU allocator
constexpr size_t kDefaultLimitMB = 2048;

class HostCache {
 public:
  HostCache() : limit_(read_limit()) {}

  size_t limit() const { return limit_; }

  // A block of at least `bytes` (a free one up to 1/8 larger, else a new one).
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 8) {
        void* p = it->second;
        free_bytes_ -= it->first;
        live_bytes_ += it->first;
        free_.erase(it);
        ++hits_;
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kAlignment, bytes) != 0 || p == nullptr) {
      cpu_cache_clear();  // memory held here may be what the system is missing
      TORCH_CHECK(posix_memalign(&p, kAlignment, bytes) == 0 && p != nullptr,
                  "hmlstm: out of memory allocating a ", bytes, "-byte CPU buffer");
    }
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = bytes;
    live_bytes_ += bytes;
    ++misses_;
    return p;
  }

  // Called by the deleter of the last tensor of block p.
  void release(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t bytes = sizes_.at(p);
    live_bytes_ -= bytes;
    if (bytes > limit_) {
      drop(p);
      return;
    }
    while (free_bytes_ + bytes > limit_) {  // evict the largest free blocks first
      auto last = std::prev(free_.end());
      free_bytes_ -= last->first;
      drop(last->second);
      free_.erase(last);
    }
    free_.emplace(bytes, p);
    free_bytes_ += bytes;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& kv : free_) drop(kv.second);
    free_.clear();
    free_bytes_ = 0;
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(free_bytes_), static_cast<int64_t>(live_bytes_), hits_, misses_,
            static_cast<int64_t>(limit_)};
  }

 private:
  static size_t read_limit() {
    const char* v = std::getenv("HMLSTM_CPU_CACHE_MB");
    if (v == nullptr || *v == '\0') return kDefaultLimitMB << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(v, &end, 10);
    TORCH_CHECK(end != nullptr && *end == '\0' && mb >= 0, "hmlstm: HMLSTM_CPU_CACHE_MB must be a whole number of ",
                "megabytes >= 0 (0 turns the CPU buffer cache off), got '", std::string(v), "'");
    return static_cast<size_t>(mb) << 20;
  }

  void drop(void* p) {  // mu_ held
    sizes_.erase(p);
    std::free(p);
  }

  const size_t limit_;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;         // bytes -> free block
  std::unordered_map<void*, size_t> sizes_;   // every block allocated here and not yet freed
  size_t free_bytes_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors of its blocks may outlive static destruction at interpreter exit.
HostCache& cache() {
  static HostCache* c = new HostCache();
  return *c;
}

}  // namespace

at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  TORCH_CHECK(opts.device().is_cpu(), "hmlstm: cached_empty is for CPU tensors, got ", opts.device());
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(shape)) * c10::elementSize(opts.dtype().toScalarType());
  HostCache& c = cache();
  if (bytes < kCachedMinBytes || c.limit() == 0) return at::empty(shape, opts);
  void* p = c.acquire(bytes);
  return at::from_blob(p, shape, [](void* q) { cache().release(q); }, opts);
}

std::vector<int64_t> cpu_cache_info() { return cache().info(); }

void cpu_cache_clear() { cache().clear(); }

}  // namespace hmlstm
