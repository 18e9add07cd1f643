// Recycled CPU buffers for large gradients (what a caching allocator does on GPU).
//
// glibc serves every allocation above 32 MB with a fresh mmap and returns it with munmap, so each backward
// of a large cross-entropy writes into never-touched pages: the kernel zeroes every page on first touch.
// At N = 4096, V = 32000 fp32 (524 MB) that costs more than the whole gradient computation (see
// benchmarks/results/cpu). A training loop frees the gradient of step k before step k + 1 needs one of the
// same size, so keeping a few freed blocks, already faulted in and backed by huge pages, removes that cost.
//
// Only blocks of at least kMinBytes are cached; at most kMaxCachedBlocks free blocks are kept (the least
// recently freed is returned to the OS first), and FLOOD_KERNELS_CPU_BUFFER_CACHE=0 turns caching off (blocks
// are still 2 MB aligned and ask for transparent huge pages: 512x fewer faults than 4 KB pages).
// flood_kernels.empty_cpu_cache() (the op flood_kernels::empty_cpu_cache) returns every free block.

#include "flood_ce.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace flood_kernels {
namespace {

constexpr size_t kHugePage = size_t{1} << 21;
constexpr size_t kMinBytes = size_t{32} << 20;  // glibc's largest mmap threshold: smaller blocks are reused anyway
constexpr size_t kMaxCachedBlocks = 2;          // e.g. the gradients of two loss calls per step

struct Block {
  void* data;
  size_t capacity;
};

bool caching_enabled() {
  static const bool enabled = [] {
    const char* flag = std::getenv("FLOOD_KERNELS_CPU_BUFFER_CACHE");
    return flag == nullptr || std::strcmp(flag, "0") != 0;
  }();
  return enabled;
}

class BufferCache {
 public:
  // A block of at least `nbytes` (rounded up to 2 MB): the smallest free one that is not more than 25%
  // larger, or a new one asking for transparent huge pages.
  Block* take(size_t nbytes) {
    const size_t capacity = (nbytes + kHugePage - 1) & ~(kHugePage - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if ((*it)->capacity >= capacity && (*it)->capacity <= capacity + capacity / 4 &&
            (best == free_.end() || (*it)->capacity < (*best)->capacity)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        Block* block = *best;
        free_.erase(best);
        return block;
      }
    }
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, kHugePage, capacity) == 0 && data != nullptr,
                "flood_kernels: out of CPU memory allocating a ", capacity, "-byte gradient buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, capacity, MADV_HUGEPAGE);  // advisory: failure only means 4 KB pages
#endif
    return new Block{data, capacity};
  }

  void give_back(Block* block) {
    if (!caching_enabled()) {
      release(block);
      return;
    }
    Block* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(block);
      if (free_.size() > kMaxCachedBlocks) {
        evicted = free_.front();
        free_.pop_front();
      }
    }
    release(evicted);
  }

  void clear() {
    std::deque<Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
    }
    for (Block* block : blocks) release(block);
  }

 private:
  static void release(Block* block) {
    if (block == nullptr) return;
    std::free(block->data);
    delete block;
  }

  std::mutex mutex_;
  std::deque<Block*> free_;  // oldest first
};

// Never destroyed: tensors holding a block may be freed during interpreter shutdown.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

}  // namespace

at::Tensor empty_gradient_cpu(const at::Tensor& like) {
  const auto options = like.options().memory_format(c10::MemoryFormat::Contiguous);
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (nbytes < kMinBytes) return at::empty(like.sizes(), options);
  Block* block = cache().take(nbytes);
  return at::from_blob(block->data, like.sizes(), [block](void*) { cache().give_back(block); }, options);
}

void empty_cpu_cache() { cache().clear(); }

}  // namespace flood_kernels
