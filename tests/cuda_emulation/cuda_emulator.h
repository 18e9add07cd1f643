// A CPU emulation of the CUDA features csrc/cuda/flood_ce.cu uses, so that its kernels and launchers run, unchanged,
// in the test suite of a machine without a GPU (tests/cuda_emulation/__init__.py builds them against this header).
//
// Execution model:
// - Every CUDA thread is a fiber with a stack of its own. The fibers of a block run on one OS thread and switch
//   only where CUDA threads wait for each other: __syncthreads, __syncwarp, warp shuffles, cluster barriers. At
//   each of those points the order in which the waiting fibers resume is reshuffled (schedule_seed), so a result
//   that depends on an order the barriers do not impose differs between schedules.
// - __shared__ variables become thread_local ones (tests/cuda_emulation/__init__.py rewrites the declarations):
//   each block (one OS thread) has its own copy, filled with NaN bytes when the block first reaches the
//   declaration, so a read of a slot no thread wrote is NaN. The blocks of a thread-block cluster run
//   concurrently, one OS thread each; map_shared_rank finds block r's copy at the same offset from block r's TLS
//   anchor (the layout of a module's TLS block is the same in every thread).
// - Strict where CUDA leaves behaviour undefined or the hardware would fail: a __syncthreads that some threads
//   reach at another line or after others exited, a warp operation that not all 32 lanes reach at the same line, a
//   full-mask warp operation with exited lanes, a deadlock, __trap(), a fault (an invalid address; under ASan, its
//   report instead), a cluster launch on a device or build without clusters, a grid that is not a whole number of
//   clusters. The launch then fails with a message naming the source line (the translation unit keeps
//   flood_ce.cu's line numbers) or the faulting address.
// - __expf is exp2(x * log2(e)) in float, as the GPU's ex2.approx computes it, up to its last-bit error.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)  // built with -fsanitize=address: tell ASan about every stack switch
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#ifndef FLOOD_EMULATED_SM
#error "FLOOD_EMULATED_SM (the architecture the kernels are compiled for, e.g. 90) must be defined"
#endif

// ---- CUDA keywords and vector types ------------------------------------------------------------------

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float __expf(float x) { return std::exp2(x * 1.44269504088896341f); }

// ---- the emulator's state ----------------------------------------------------------------------------

namespace cuda_emulator {

struct Settings {
  int device_sm = FLOOD_EMULATED_SM;  // what the device reports; the code itself is built for FLOOD_EMULATED_SM
  int max_active_clusters = 132;      // cudaOccupancyMaxActiveClusters' answer (0: no cluster fits)
  uint64_t schedule_seed = 0;         // 0: fibers resume in thread order; otherwise a shuffled order per seed
};
inline Settings& settings() {
  static Settings s;
  return s;
}

struct LaunchRecord {
  std::string api;
  dim3 grid;
  dim3 block;
  unsigned cluster;
};
inline std::mutex& log_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

enum class Wait { kRunnable, kBlockBarrier, kWarpOp, kClusterBarrier, kExited, kFailed };

struct Fiber {
  void* sp = nullptr;  // saved stack pointer (x86-64 switch)
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  void* asan_fake_stack = nullptr;
  uint3 thread_idx;
  int warp = 0;
  int lane = 0;
  Wait wait = Wait::kRunnable;
  int line = 0;                     // source line of the barrier or warp operation it waits at
  uint64_t cluster_arrivals = 0;    // cluster barrier phases this thread has arrived at
  bool cluster_arrived = false;     // arrived at phase cluster_arrivals - 1 and not waited for it yet
};

struct WarpState {
  uint64_t slots[2][32];  // shuffled values, double-buffered by generation parity
  uint64_t generation = 0;
  int lanes = 32;
};

// The blocks of one cluster: their barrier and their TLS anchors (for map_shared_rank).
struct Cluster {
  unsigned size = 1;
  uint64_t threads = 0;  // all the cluster's threads: a barrier phase completes when this many arrived
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<uint64_t> arrivals;  // per phase
  std::vector<char*> anchors;      // per rank
  std::vector<bool> finished;      // per rank
  bool aborted = false;
};

inline thread_local char tls_anchor;  // map_shared_rank's reference point in each OS thread's TLS

struct BlockRun {
  dim3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  Cluster* cluster = nullptr;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_context;
#endif
  const void* scheduler_stack = nullptr;  // the OS thread's stack (bottom, size), for ASan's stack switches
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
  const char* fiber_stacks = nullptr;     // fiber i's stack starts at fiber_stacks + i * fiber_stack_stride
  size_t fiber_stack_stride = 0;
  std::vector<const void*> shared_declared;  // this block's __shared__ variables, poisoned on first declaration
  bool fiber_running = false;                // a CUDA thread runs (a fault is the kernel's)
  std::string error;
};

inline thread_local BlockRun* tls_block = nullptr;

inline BlockRun& block() { return *tls_block; }
inline Fiber& fiber() { return *tls_block->current; }

}  // namespace cuda_emulator

// The built-in variables of the running CUDA thread: per OS thread, set by the scheduler before it resumes a fiber
// (fibers switch only inside the emulator's calls, so a kernel always reads its own thread's values).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- fibers ------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// cuda_emulator_switch(save, load): saves the callee-saved registers, the SSE and x87 control words and the stack
// pointer (into *save), then resumes the context whose stack pointer is `load`.
extern "C" void cuda_emulator_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl cuda_emulator_switch
    .hidden cuda_emulator_switch
    .type cuda_emulator_switch, @function
cuda_emulator_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr 8(%rsp)
    fldcw (%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emulator_switch, .-cuda_emulator_switch
)");
#endif

namespace cuda_emulator {

constexpr size_t kStackBytes = 64 * 1024;

inline void fiber_main();

// Back to the block's scheduler; returns when the scheduler resumes this fiber. `final`: the fiber is done and
// never resumed (ASan drops its fake stack).
inline void yield(bool final = false) {
  BlockRun& b = block();
  Fiber& f = *b.current;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(final ? nullptr : &f.asan_fake_stack, b.scheduler_stack, b.scheduler_stack_size);
#else
  (void)final;
#endif
#if defined(__x86_64__)
  cuda_emulator_switch(&f.sp, b.scheduler_sp);
#else
  swapcontext(&f.context, &b.scheduler_context);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, nullptr, nullptr);
#endif
}

inline void resume(BlockRun& b, Fiber& f) {
  b.current = &f;
  threadIdx = f.thread_idx;
#if defined(__SANITIZE_ADDRESS__)
  const size_t i = static_cast<size_t>(&f - b.fibers.data());
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, b.fiber_stacks + i * b.fiber_stack_stride, kStackBytes);
#endif
  b.fiber_running = true;
#if defined(__x86_64__)
  cuda_emulator_switch(&b.scheduler_sp, f.sp);
#else
  swapcontext(&b.scheduler_context, &f.context);
#endif
  b.fiber_running = false;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
}

// Stops this CUDA thread for good and fails the launch with `message`.
[[noreturn]] inline void fail(const std::string& message) {
  BlockRun& b = block();
  if (b.error.empty()) b.error = message;
  b.current->wait = Wait::kFailed;
  yield(/*final=*/true);
  std::abort();  // never resumed
}

// "block (x,y,z), thread (x,y,z)" of the CUDA thread that runs now.
inline std::string running_thread() {
  const BlockRun& b = block();
  std::ostringstream out;
  out << "block (" << b.block_idx.x << "," << b.block_idx.y << "," << b.block_idx.z << "), thread ("
      << b.current->thread_idx.x << "," << b.current->thread_idx.y << "," << b.current->thread_idx.z << ")";
  return out.str();
}

// A fault (SIGSEGV, SIGBUS) in a kernel fails its launch with the address, as an illegal address fails a launch on
// a GPU, instead of taking the process down; faults anywhere else go to the handler that was there before (Python's
// faulthandler under pytest). Under ASan, ASan's own handler reports them.
inline struct sigaction previous_fault_actions[2];

inline void on_fault(int signal, siginfo_t* info, void*) {
  BlockRun* b = tls_block;
  if (b == nullptr || !b->fiber_running) {
    sigaction(signal, &previous_fault_actions[signal == SIGBUS], nullptr);
    return;  // the instruction faults again, under the previous handler
  }
  std::ostringstream out;
  out << (signal == SIGBUS ? "SIGBUS" : "SIGSEGV") << ": invalid memory access at " << info->si_addr << " in "
      << running_thread();
  fail(out.str());  // to the scheduler; the signal frame is abandoned (SA_NODEFER: nothing stays blocked)
}

inline void install_fault_handler() {
#if !defined(__SANITIZE_ADDRESS__)
  const int signals[2] = {SIGSEGV, SIGBUS};
  for (int i = 0; i < 2; ++i) {
    struct sigaction current {};
    sigaction(signals[i], nullptr, &current);
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == &on_fault) continue;
    struct sigaction action {};
    action.sa_sigaction = &on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(signals[i], &action, &previous_fault_actions[i]);
  }
#endif
}

inline std::string where(int line) { return "flood_ce.cu:" + std::to_string(line) + ", " + running_thread(); }

inline void fiber_main() {
  BlockRun& b = block();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    fail(std::string("exception in a kernel: ") + e.what());
  }
  b.current->wait = Wait::kExited;
  yield(/*final=*/true);
  std::abort();  // an exited fiber is never resumed
}

// Fiber stacks of one OS thread, each below a guard page (a stack overflow faults instead of corrupting memory).
class Stacks {
 public:
  explicit Stacks(size_t count) : count_(count), stride_(kStackBytes + page()) {
    memory_ = static_cast<char*>(mmap(nullptr, count_ * stride_, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    TORCH_CHECK(memory_ != MAP_FAILED, "cuda_emulator: cannot map ", count_, " fiber stacks");
    for (size_t i = 0; i < count_; ++i) mprotect(memory_ + i * stride_, page(), PROT_NONE);
  }
  ~Stacks() {
#if defined(__SANITIZE_ADDRESS__)
    // Abandoned fiber frames leave redzones in the shadow, which would outlive the mapping and poison whatever the
    // process maps there next.
    ASAN_UNPOISON_MEMORY_REGION(memory_, count_ * stride_);
#endif
    munmap(memory_, count_ * stride_);
  }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* bottom(size_t i) const { return memory_ + i * stride_ + page(); }
  size_t stride() const { return stride_; }
  char* top(size_t i) const { return memory_ + (i + 1) * stride_; }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  size_t count_;
  size_t stride_;
  char* memory_;
};

inline void start_fiber(Fiber& f, const Stacks& stacks, size_t i) {
#if defined(__SANITIZE_ADDRESS__)
  // A stack reused from an earlier block still carries the redzones of the frames its fiber left without returning.
  ASAN_UNPOISON_MEMORY_REGION(stacks.bottom(i), kStackBytes);
#endif
#if defined(__x86_64__)
  // The frame cuda_emulator_switch pops: control words, six registers, then fiber_main as the return address,
  // placed so that fiber_main starts with the stack alignment of a called function.
  uint64_t* top = reinterpret_cast<uint64_t*>(stacks.top(i));
  uint64_t* sp = top - 10;
  uint32_t mxcsr;
  uint16_t x87;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(x87));
  std::memset(sp, 0, 10 * sizeof(uint64_t));
  std::memcpy(reinterpret_cast<char*>(sp), &x87, sizeof(x87));
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &mxcsr, sizeof(mxcsr));
  sp[8] = reinterpret_cast<uint64_t>(&fiber_main);
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = stacks.bottom(i);
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, &fiber_main, 0);
#endif
}

// A __shared__ declaration (rewritten to `static thread_local T name; fresh_shared(&name, sizeof(name));`): the
// first thread of the block to reach it fills the variable with 0xff bytes, NaN in every floating type, as shared
// memory holds no defined value when a block starts.
inline void fresh_shared(void* variable, size_t bytes) {
  std::vector<const void*>& declared = block().shared_declared;
  if (std::find(declared.begin(), declared.end(), variable) != declared.end()) return;
  declared.push_back(variable);
  std::memset(variable, 0xff, bytes);
}

// ---- synchronization ---------------------------------------------------------------------------------

inline void sync_threads(int line) {
  Fiber& f = fiber();
  f.wait = Wait::kBlockBarrier;
  f.line = line;
  yield();
}

inline void sync_warp(unsigned mask, int line) {
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask is not emulated (" + where(line) + ")");
  Fiber& f = fiber();
  f.wait = Wait::kWarpOp;
  f.line = line;
  yield();
}

template <typename T>
T shuffle(unsigned mask, T value, int lane_arg, bool xor_lanes, int width, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of up to 8 bytes");
  if (mask != 0xffffffffu || width != 32) {
    fail("only full-warp shuffles (mask 0xffffffff, width 32) are emulated (" + where(line) + ")");
  }
  BlockRun& b = block();
  Fiber& f = *b.current;
  WarpState& w = b.warps[f.warp];
  const int parity = static_cast<int>(w.generation & 1);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slots[parity][f.lane] = bits;
  f.wait = Wait::kWarpOp;
  f.line = line;
  yield();
  int source = xor_lanes ? (f.lane ^ lane_arg) : (lane_arg & 31);
  if (source >= w.lanes) source = f.lane;
  T out;
  std::memcpy(&out, &w.slots[parity][source], sizeof(T));
  return out;
}

[[noreturn]] inline void trap(int line) { fail("__trap() at " + where(line)); }

// Cluster barrier: arrive counts this thread in the current phase; wait blocks until every thread of the
// cluster arrived at the phase this thread last arrived at (barrier.cluster.arrive / .wait).
inline void cluster_arrive(int line) {
  BlockRun& b = block();
  Fiber& f = *b.current;
  if (b.cluster == nullptr) fail("cluster barrier in a launch without clusters (" + where(line) + ")");
  if (f.cluster_arrived) fail("cluster barrier_arrive twice without barrier_wait (" + where(line) + ")");
  Cluster& c = *b.cluster;
  std::lock_guard<std::mutex> lock(c.mutex);
  const uint64_t phase = f.cluster_arrivals++;
  if (c.arrivals.size() <= phase) c.arrivals.resize(phase + 1, 0);
  if (++c.arrivals[phase] == c.threads) c.changed.notify_all();
  f.cluster_arrived = true;
}

inline void cluster_wait(int line) {
  Fiber& f = fiber();
  if (!f.cluster_arrived) fail("cluster barrier_wait without barrier_arrive (" + where(line) + ")");
  f.wait = Wait::kClusterBarrier;
  f.line = line;
  yield();
  f.cluster_arrived = false;
}

// ---- the block scheduler -----------------------------------------------------------------------------

inline std::string describe_waits(const BlockRun& b) {
  std::ostringstream out;
  const char* names[] = {"runnable", "__syncthreads", "warp op", "cluster barrier", "exited", "failed"};
  std::vector<std::pair<std::string, int>> counts;
  for (const Fiber& f : b.fibers) {
    std::ostringstream key;
    key << names[static_cast<int>(f.wait)];
    if (f.wait == Wait::kBlockBarrier || f.wait == Wait::kWarpOp || f.wait == Wait::kClusterBarrier) {
      key << " at line " << f.line;
    }
    auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& kv) { return kv.first == key.str(); });
    if (it == counts.end()) counts.emplace_back(key.str(), 1);
    else ++it->second;
  }
  for (size_t i = 0; i < counts.size(); ++i) out << (i ? ", " : "") << counts[i].second << " " << counts[i].first;
  return out.str();
}

// Releases every warp whose lanes all wait at one warp operation; fails on a warp whose waiting lanes cannot
// all meet (different lines, or lanes that exited).
inline bool release_warps(BlockRun& b) {
  bool released = false;
  for (size_t w = 0; w < b.warps.size(); ++w) {
    const size_t first = w * 32;
    const size_t end = std::min(b.fibers.size(), first + 32);
    int waiting = 0, exited = 0, line = -1;
    for (size_t i = first; i < end; ++i) {
      const Fiber& f = b.fibers[i];
      if (f.wait == Wait::kWarpOp) {
        if (line >= 0 && f.line != line) {
          b.error = "warp " + std::to_string(w) + " of block " + std::to_string(b.block_idx.x) +
                    ": lanes at different warp operations (flood_ce.cu lines " + std::to_string(line) + " and " +
                    std::to_string(f.line) + ")";
          return false;
        }
        line = f.line;
        ++waiting;
      }
      if (f.wait == Wait::kExited) ++exited;
    }
    if (waiting == 0) continue;
    if (exited > 0) {
      b.error = "warp " + std::to_string(w) + " of block " + std::to_string(b.block_idx.x) +
                ": a full-mask warp operation at flood_ce.cu:" + std::to_string(line) + " after " +
                std::to_string(exited) + " of its lanes exited (undefined in CUDA)";
      return false;
    }
    if (waiting < static_cast<int>(end - first)) continue;  // other lanes are still on their way (or deadlocked)
    for (size_t i = first; i < end; ++i) b.fibers[i].wait = Wait::kRunnable;
    ++b.warps[w].generation;
    released = true;
  }
  return released;
}

// Releases the block barrier once every thread waits at it, at one line, and none exited.
inline bool release_block_barrier(BlockRun& b) {
  int line = -1;
  size_t exited = 0;
  for (const Fiber& f : b.fibers) {
    if (f.wait == Wait::kExited) {
      ++exited;
      continue;
    }
    if (f.wait != Wait::kBlockBarrier) return false;
    if (line >= 0 && f.line != line) {
      b.error = "block " + std::to_string(b.block_idx.x) + ": __syncthreads at different lines (flood_ce.cu:" +
                std::to_string(line) + " and " + std::to_string(f.line) + ")";
      return false;
    }
    line = f.line;
  }
  if (line < 0) return false;
  if (exited > 0) {
    b.error = "block " + std::to_string(b.block_idx.x) + ": __syncthreads at flood_ce.cu:" + std::to_string(line) +
              " after " + std::to_string(exited) + " of its threads exited (undefined in CUDA)";
    return false;
  }
  for (Fiber& f : b.fibers) f.wait = Wait::kRunnable;
  return true;
}

// Waits (this OS thread) until the cluster phase some fiber waits for is complete, then releases those fibers.
inline bool release_cluster_waiters(BlockRun& b) {
  std::vector<Fiber*> waiting;
  for (Fiber& f : b.fibers) {
    if (f.wait == Wait::kClusterBarrier) waiting.push_back(&f);
  }
  if (waiting.empty()) return false;
  Cluster& c = *b.cluster;
  std::unique_lock<std::mutex> lock(c.mutex);
  auto complete = [&](const Fiber* f) {
    const uint64_t phase = f->cluster_arrivals - 1;
    return phase < c.arrivals.size() && c.arrivals[phase] == c.threads;
  };
  const bool done = c.changed.wait_for(lock, std::chrono::seconds(60), [&] {
    return c.aborted || std::any_of(waiting.begin(), waiting.end(), complete);
  });
  if (c.aborted) {
    b.error = "another block of the cluster failed";
    return false;
  }
  if (!done) {
    b.error = "block " + std::to_string(b.block_idx.x) + ": cluster barrier deadlock (" + describe_waits(b) + ")";
    return false;
  }
  for (Fiber* f : waiting) {
    if (complete(f)) f->wait = Wait::kRunnable;
  }
  return true;
}

// Runs one block to completion on this OS thread. Returns the error, empty on success.
inline std::string run_block(BlockRun& b, const Stacks& stacks, std::mt19937_64* schedule) {
  const unsigned threads = b.block_dim.x * b.block_dim.y * b.block_dim.z;
  b.fibers.assign(threads, Fiber{});
  b.warps.assign((threads + 31) / 32, WarpState{});
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = b.fibers[i];
    f.thread_idx = dim3(i % b.block_dim.x, (i / b.block_dim.x) % b.block_dim.y, i / (b.block_dim.x * b.block_dim.y));
    f.warp = static_cast<int>(i / 32);
    f.lane = static_cast<int>(i % 32);
    start_fiber(f, stacks, i);
  }
  for (size_t w = 0; w < b.warps.size(); ++w) {
    b.warps[w].lanes = static_cast<int>(std::min<size_t>(32, threads - w * 32));
  }
  b.fiber_stacks = stacks.bottom(0);
  b.fiber_stack_stride = stacks.stride();
  tls_block = &b;
  blockIdx = b.block_idx;
  blockDim = b.block_dim;
  gridDim = b.grid_dim;
  std::vector<unsigned> order(threads);
  for (unsigned i = 0; i < threads; ++i) order[i] = i;
  while (b.error.empty()) {
    if (schedule != nullptr) std::shuffle(order.begin(), order.end(), *schedule);
    for (unsigned i : order) {
      if (b.fibers[i].wait != Wait::kRunnable) continue;
      resume(b, b.fibers[i]);
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    if (std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.wait == Wait::kExited; })) break;
    bool released = release_warps(b);
    if (b.error.empty() && !released) released = release_block_barrier(b);
    if (b.error.empty() && !released) released = release_cluster_waiters(b);
    if (b.error.empty() && !released) {
      b.error = "block " + std::to_string(b.block_idx.x) + ": deadlock (" + describe_waits(b) + ")";
    }
  }
  tls_block = nullptr;
  return b.error;
}

// ---- launches ----------------------------------------------------------------------------------------

// Runs the grid: clusters one after another, the blocks of a cluster concurrently (one OS thread per rank).
inline void run_grid(const char* api, dim3 grid, dim3 block_dim, unsigned cluster_size,
                     const std::function<void()>& body) {
  const uint64_t threads = static_cast<uint64_t>(block_dim.x) * block_dim.y * block_dim.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && block_dim.z <= 64, "cuda_emulator: invalid block (", block_dim.x,
              ",", block_dim.y, ",", block_dim.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535,
              "cuda_emulator: invalid grid (", grid.x, ",", grid.y, ",", grid.z, ")");
  TORCH_CHECK(cluster_size >= 1 && cluster_size <= 8, "cuda_emulator: cluster of ", cluster_size,
              " blocks (the portable maximum is 8)");
  TORCH_CHECK(cluster_size == 1 || (settings().device_sm >= 90 && FLOOD_EMULATED_SM >= 90),
              "cuda_emulator: a cluster launch needs an sm_90 device and code built for it (device sm_",
              settings().device_sm, ", code sm_", FLOOD_EMULATED_SM, ")");
  TORCH_CHECK(grid.x % cluster_size == 0, "cuda_emulator: grid.x = ", grid.x, " is not a multiple of the cluster size ",
              cluster_size);
  {
    std::lock_guard<std::mutex> lock(log_mutex());
    launch_log().push_back({api, grid, block_dim, cluster_size});
  }
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const uint64_t clusters = blocks / cluster_size;
  std::vector<std::string> errors(cluster_size);
  std::mutex step_mutex;
  std::condition_variable step_changed;
  uint64_t started = 0;  // clusters whose blocks may start
  std::vector<uint64_t> finished(cluster_size, 0);
  std::unique_ptr<Cluster> current_cluster;  // the running cluster's state, replaced when all its blocks finished
  bool stop = false;

  install_fault_handler();
  auto worker = [&](unsigned rank) {
    // The fault handler's own stack: a fiber that overflows into its guard page has none left.
    std::vector<char> signal_stack(64 * 1024);
    stack_t alternate{signal_stack.data(), 0, signal_stack.size()};
    stack_t previous_stack{};
    sigaltstack(&alternate, &previous_stack);
    struct RestoreStack {
      stack_t stack;
      ~RestoreStack() { sigaltstack(&stack, nullptr); }
    } restore{previous_stack};
    Stacks stacks(threads);
    std::mt19937_64 schedule(settings().schedule_seed * 0x9E3779B97F4A7C15ull + rank);
    for (uint64_t c = 0; c < clusters; ++c) {
      Cluster* cluster = nullptr;
      {
        std::unique_lock<std::mutex> lock(step_mutex);
        step_changed.wait(lock, [&] { return stop || started > c; });
        if (stop) return;
        cluster = current_cluster.get();
      }
      {
        std::lock_guard<std::mutex> lock(cluster->mutex);
        cluster->anchors[rank] = &tls_anchor;
      }
      BlockRun b;
      const uint64_t linear = c * cluster_size + rank;
      b.block_idx = dim3(static_cast<unsigned>(linear % grid.x), static_cast<unsigned>((linear / grid.x) % grid.y),
                         static_cast<unsigned>(linear / (static_cast<uint64_t>(grid.x) * grid.y)));
      b.block_dim = block_dim;
      b.grid_dim = grid;
      b.cluster = cluster_size > 1 ? cluster : nullptr;
      b.body = &body;
      std::string error = run_block(b, stacks, settings().schedule_seed ? &schedule : nullptr);
      {
        std::lock_guard<std::mutex> lock(cluster->mutex);
        cluster->finished[rank] = true;
        if (!error.empty()) {
          cluster->aborted = true;
          cluster->changed.notify_all();
        }
      }
      std::lock_guard<std::mutex> lock(step_mutex);
      if (!error.empty()) {
        errors[rank] = error;
        stop = true;
      }
      finished[rank] = c + 1;
      step_changed.notify_all();
      if (stop) return;
    }
  };
  auto new_cluster = [&] {
    auto c = std::make_unique<Cluster>();
    c->size = cluster_size;
    c->threads = threads * cluster_size;
    c->anchors.assign(cluster_size, nullptr);
    c->finished.assign(cluster_size, false);
    return c;
  };

  std::vector<std::thread> workers;
  for (unsigned r = 0; r < cluster_size; ++r) workers.emplace_back(worker, r);
  for (uint64_t c = 0; c <= clusters; ++c) {  // waits for cluster c - 1 to finish, then starts cluster c
    std::unique_lock<std::mutex> lock(step_mutex);
    step_changed.wait(lock, [&] {
      return stop || std::all_of(finished.begin(), finished.end(), [&](uint64_t f) { return f == c; });
    });
    if (stop || c == clusters) break;
    current_cluster = new_cluster();
    started = c + 1;
    step_changed.notify_all();
  }
  {
    std::lock_guard<std::mutex> lock(step_mutex);
    stop = true;  // every worker has returned or is waiting for a cluster that will not start
    step_changed.notify_all();
  }
  for (std::thread& t : workers) t.join();
  // The first block's own failure, not the "another block failed" of the blocks it stopped.
  std::stable_partition(errors.begin(), errors.end(), [](const std::string& e) {
    return !e.empty() && e.rfind("another block", 0) != 0;
  });
  for (const std::string& e : errors) {
    TORCH_CHECK(e.empty(), "cuda_emulator: ", api, " launch of grid (", grid.x, ",", grid.y, ",", grid.z,
                "), block (", block_dim.x, ",", block_dim.y, ",", block_dim.z, "), cluster ", cluster_size,
                " failed: ", e);
  }
}

// What every CUDA thread of a launch runs: the kernel, with the arguments converted to its parameters' types once.
template <typename... Params, typename... Args>
std::function<void()> bind_kernel(void (*kernel)(Params...), Args&&... args) {
  return [kernel, params = std::make_tuple(static_cast<Params>(std::forward<Args>(args))...)] {
    std::apply(kernel, params);
  };
}

// kernel<<<grid, block, shared_bytes, stream>>>(args) is rewritten to launch(kernel, grid, block, ...)(args).
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid;
  dim3 block;
  template <typename... Args>
  void operator()(Args&&... args) const {
    run_grid("<<<>>>", grid, block, 1, bind_kernel(kernel, std::forward<Args>(args)...));
  }
};

template <typename... Params, typename Stream>
Launcher<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Stream) {
  TORCH_CHECK(shared_bytes == 0, "cuda_emulator: dynamic shared memory is not emulated");
  return {kernel, grid, block};
}

// at::empty for the ops' outputs, filled with NaN bytes (0xff: NaN in every floating dtype), so that an element no
// kernel writes shows up as NaN instead of whatever the allocator's memory held.
inline at::Tensor poisoned_empty(c10::IntArrayRef sizes, const c10::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  std::memset(t.data_ptr(), 0xff, t.nbytes());
  return t;
}

inline void configure(int64_t device_sm, int64_t max_active_clusters, int64_t schedule_seed) {
  settings().device_sm = static_cast<int>(device_sm);
  settings().max_active_clusters = static_cast<int>(max_active_clusters);
  settings().schedule_seed = static_cast<uint64_t>(schedule_seed);
}

// The launches since the last call, one line each: "<api> grid=(x,y,z) block=(x,y,z) cluster=n".
inline std::string take_launches() {
  std::lock_guard<std::mutex> lock(log_mutex());
  std::ostringstream out;
  for (const LaunchRecord& r : launch_log()) {
    out << r.api << " grid=(" << r.grid.x << "," << r.grid.y << "," << r.grid.z << ") block=(" << r.block.x << ","
        << r.block.y << "," << r.block.z << ") cluster=" << r.cluster << "\n";
  }
  launch_log().clear();
  return out.str();
}

inline void define_control_ops(torch::Library& m) {
  m.def("configure(int device_sm, int max_active_clusters, int schedule_seed) -> ()", &configure);
  m.def("take_launches() -> str", &take_launches);
}

}  // namespace cuda_emulator

#define __syncthreads() ::cuda_emulator::sync_threads(__LINE__)
#define __syncwarp(...) ::cuda_emulator::sync_warp(0xffffffffu, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::cuda_emulator::shuffle(mask, value, lane_mask, /*xor_lanes=*/true, 32, __LINE__)
#define __shfl_sync(mask, value, source_lane) \
  ::cuda_emulator::shuffle(mask, value, source_lane, /*xor_lanes=*/false, 32, __LINE__)
#define __trap() ::cuda_emulator::trap(__LINE__)

// ---- cooperative_groups (clusters) -------------------------------------------------------------------

namespace cooperative_groups {
struct cluster_group {
  void barrier_arrive() const { ::cuda_emulator::cluster_arrive(__LINE__); }
  void barrier_wait() const { ::cuda_emulator::cluster_wait(__LINE__); }
  void sync() const {
    barrier_arrive();
    barrier_wait();
  }
  // Block `rank`'s copy of the __shared__ (thread_local) variable at addr.
  template <typename T>
  T* map_shared_rank(T* addr, unsigned rank) const {
    ::cuda_emulator::Cluster& c = *::cuda_emulator::block().cluster;
    char* anchor = nullptr;
    {
      std::lock_guard<std::mutex> lock(c.mutex);
      if (rank < c.size && !c.finished[rank]) anchor = c.anchors[rank];
    }
    if (anchor == nullptr) {
      ::cuda_emulator::fail("map_shared_rank(" + std::to_string(rank) + ") of a block that is not running");
    }
    return reinterpret_cast<T*>(anchor + (reinterpret_cast<char*>(addr) - &::cuda_emulator::tls_anchor));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// ---- the CUDA runtime and c10::cuda, as far as the launchers use them --------------------------------

struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75 };
struct cudaFuncAttributes {
  int binaryVersion;
  int ptxVersion;
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
union cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrComputeCapabilityMajor) return cudaErrorInvalidValue;
  *value = cuda_emulator::settings().device_sm / 10;
  return cudaSuccess;
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  attributes->binaryVersion = FLOOD_EMULATED_SM;
  attributes->ptxVersion = FLOOD_EMULATED_SM;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace cuda_emulator {
inline unsigned cluster_of(const cudaLaunchConfig_t& config) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config.numAttrs; ++i) {
    if (config.attrs[i].id == cudaLaunchAttributeClusterDimension) {
      const auto& d = config.attrs[i].val.clusterDim;
      TORCH_CHECK(d.y == 1 && d.z == 1, "cuda_emulator: only 1-D clusters are emulated");
      cluster = d.x;
    }
  }
  return cluster;
}
}  // namespace cuda_emulator

template <typename... Params>
cudaError_t cudaOccupancyMaxActiveClusters(int* count, void (*)(Params...), const cudaLaunchConfig_t* config) {
  const unsigned cluster = cuda_emulator::cluster_of(*config);
  if (cluster > 8 || cuda_emulator::settings().device_sm < 90) return cudaErrorInvalidValue;
  *count = cuda_emulator::settings().max_active_clusters;
  return cudaSuccess;
}

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  TORCH_CHECK(config->dynamicSmemBytes == 0, "cuda_emulator: dynamic shared memory is not emulated");
  cuda_emulator::run_grid("cudaLaunchKernelEx", config->gridDim, config->blockDim, cuda_emulator::cluster_of(*config),
                          cuda_emulator::bind_kernel(kernel, std::forward<Args>(args)...));
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                                         \
  do {                                                                                               \
    const cudaError_t emulated_error = (expr);                                                       \
    TORCH_CHECK(emulated_error == cudaSuccess, "cuda_emulator: CUDA error ", int(emulated_error)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10
