// A cache of the CPU ops' large buffers (host_cache.cpp).
//
// Why: seq_fwd and seq_bwd allocate a few large buffers per call (at the paper's PTB size about 340 MB per
// training step). glibc serves allocations this large with fresh mmap'd pages and unmaps them on free, so
// every call paid about 86k page faults, each zeroing a page: some 8% of the training step's CPU time.
// A block here is handed out as a tensor whose deleter returns it to the cache, so the next call with the
// same sizes reuses it, faulted in already. As with PyTorch's CUDA caching allocator, a block is reused
// only after the last tensor (or view) of it is gone.
//
// HMLSTM_CPU_CACHE_MB (read once, default 2048) bounds the bytes kept in free blocks; 0 turns the cache
// off. Python: hmlstm.ops.cpp.cpu_cache_info() and empty_cpu_cache().
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace hmlstm {

// An uninitialized CPU tensor of `shape`, contiguous; from the cache when it is at least kCachedMinBytes.
at::Tensor cached_empty(at::IntArrayRef shape, const at::TensorOptions& opts);

// [bytes in free blocks, bytes in blocks in use, reuses, fresh allocations, limit in bytes].
std::vector<int64_t> cpu_cache_info();

// Frees every block not in use.
void cpu_cache_clear();

}  // namespace hmlstm
