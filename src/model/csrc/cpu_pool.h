// The CPU kernels' own threads (cpu_gemm.cpp, paged_decode.cpp): a pool whose threads stay
// awake between the kernels of one model step and sleep between steps.
//
// A decode step runs ~150 GEMMs and 30 attention calls, each too short to pay for waking a
// sleeping OpenMP thread (~90 us on a 2-core VM; workers run OpenMP with the PASSIVE wait
// policy so that they never spin on a shared machine). The pool's threads instead spin for a
// bounded time after each task (SHARDLINE_CPU_SPIN_US, default 200 us), yielding the core to
// anything else that wants it every few microseconds, so the next kernel of the same step finds
// them awake; then they sleep on a futex. They also sleep at once when the core turns out to be
// contended. Work is split into chunks; each thread, the caller included, claims the chunks of
// its own contiguous region in order, then helps with the others'.
#pragma once

#include <ATen/Parallel.h>

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define SHARDLINE_CPU_RELAX() _mm_pause()
#else
#define SHARDLINE_CPU_RELAX() asm volatile("" ::: "memory")
#endif

namespace cpu_pool {

constexpr int64_t kDefaultSpinUs = 200;

// What the chunk a thread is running is, for kernels that prefetch for their next call: the
// thread's own region (its index in the pool; 0 for the caller) and whether this chunk is the
// last one of that region. Set by Pool::work for the duration of each chunk.
struct ChunkPlace {
  int own_region = 0;
  int regions = 1;
  bool last_of_own_region = false;
};
inline thread_local ChunkPlace chunk_place;

// The first chunk of region r of `regions` over `chunks` chunks (region r ends where r + 1
// begins).
inline int64_t region_begin(int64_t chunks, int64_t r, int64_t regions) {
  return chunks * r / regions;
}

inline long futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

inline int64_t spin_us_from_env() {
  const char* text = std::getenv("SHARDLINE_CPU_SPIN_US");
  if (text == nullptr || *text == '\0') return kDefaultSpinUs;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  return (end != nullptr && *end == '\0' && value >= 0) ? value : kDefaultSpinUs;
}

class Pool {
 public:
  using Fn = void (*)(const void* ctx, int64_t chunk);

  // The pool for `threads` threads in all (the caller and threads - 1 of its own); it never
  // shrinks, and is never destroyed (its threads sleep in futex_wait at process exit). A forked
  // child, which has none of the parent's threads, makes its own.
  static Pool& get(int threads) {
    static std::once_flag fork_handlers;
    std::call_once(fork_handlers, [] {
      pthread_atfork([] { creating().lock(); }, [] { creating().unlock(); },
                     [] {
                       current() = nullptr;
                       creating().unlock();
                     });
    });
    std::lock_guard<std::mutex> guard(creating());
    Pool*& pool = current();
    if (pool == nullptr || pool->size() < threads) {
      // A larger pool replaces a smaller one, whose threads stay asleep: torch's thread count
      // only grows in practice (set once per worker), so this happens at most once or twice.
      pool = new Pool(threads);
    }
    return *pool;
  }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  // fn(ctx, chunk) for every chunk in [0, chunks). The chunks are split into one contiguous
  // region per thread (the caller's first); each thread claims its own region's chunks in
  // order, one at a time, then claims what is left of the others' regions. So a thread walks
  // consecutive chunks (a kernel can prefetch past the end of its chunk for the chunk it will
  // most likely take next: the GEMM's next weight panel), and a pool thread that the OS has not
  // scheduled (another process holds its core) delays the caller by at most the one chunk it
  // took. A second caller while the pool is busy runs its chunks itself.
  void run(Fn fn, const void* ctx, int64_t chunks) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || chunks <= 1) {
      for (int64_t chunk = 0; chunk < chunks; ++chunk) fn(ctx, chunk);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    const int regions = size();
    for (int r = 0; r < regions; ++r) {
      regions_[r].next.store(region_begin(chunks, r, regions), std::memory_order_relaxed);
      regions_[r].end = region_begin(chunks, r + 1, regions);
    }
    open_.store(true, std::memory_order_seq_cst);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      futex(&generation_, FUTEX_WAKE_PRIVATE, INT_MAX);
    }
    work(0, fn, ctx);
    // No chunk is left to claim; close the job and wait for those who took one. A thread that
    // comes to it later sees it closed and leaves fn_ and ctx_ alone.
    open_.store(false, std::memory_order_seq_cst);
    for (int spins = 1; active_.load(std::memory_order_seq_cst) != 0; ++spins) {
      SHARDLINE_CPU_RELAX();
      if (spins % 64 == 0) sched_yield();
    }
  }

 private:
  static std::mutex& creating() {
    static std::mutex mutex;
    return mutex;
  }
  static Pool*& current() {
    static Pool* pool = nullptr;
    return pool;
  }

  explicit Pool(int threads)
      : spin_(std::chrono::microseconds(spin_us_from_env())), regions_(threads) {
    for (int i = 1; i < threads; ++i) {
      threads_.emplace_back([this, i] { loop(i); });
      threads_.back().detach();
    }
  }

  // Thread `self`'s region first, then the others' in turn. A region's counter only grows, so
  // each chunk is claimed once, whether by its owner or by a thief.
  void work(int self, Fn fn, const void* ctx) {
    const int regions = static_cast<int>(regions_.size());
    chunk_place.own_region = self;
    chunk_place.regions = regions;
    for (int i = 0; i < regions; ++i) {
      Region& region = regions_[(self + i) % regions];
      for (;;) {
        const int64_t chunk = region.next.fetch_add(1, std::memory_order_relaxed);
        if (chunk >= region.end) break;
        chunk_place.last_of_own_region = i == 0 && chunk == region.end - 1;
        fn(ctx, chunk);
      }
    }
    chunk_place.last_of_own_region = false;
  }

  void loop(int self) {
    uint32_t seen = 0;
    for (;;) {
      seen = wait_for_work(seen);
      active_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst)) {  // the job stays open while we are active
        work(self, fn_, ctx_);
      }
      active_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  // Spin until the generation moves past `seen`, yielding every few microseconds; sleep on the
  // futex after spin_ without work, or at once when a yield gave the core to another thread
  // for a while (the core is contended: spinning would only take time from others, and a
  // sleeper is woken with priority, while a yielded spinner waits for the other's time slice).
  uint32_t wait_for_work(uint32_t seen) {
    using Clock = std::chrono::steady_clock;
    constexpr auto kContended = std::chrono::microseconds(30);
    auto last = Clock::now();
    auto deadline = last + spin_;
    for (int spins = 1;; ++spins) {
      const uint32_t now_at = generation_.load(std::memory_order_acquire);
      if (now_at != seen) return now_at;
      SHARDLINE_CPU_RELAX();
      if (spins % 64 != 0) continue;
      const auto now = Clock::now();
      if (now < deadline && now - last < kContended) {
        last = now;
        sched_yield();
        continue;
      }
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      if (generation_.load(std::memory_order_seq_cst) == seen) {
        futex(&generation_, FUTEX_WAIT_PRIVATE, seen);
      }
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      last = Clock::now();
      deadline = last + spin_;
    }
  }

  const std::chrono::microseconds spin_;
  std::vector<std::thread> threads_;
  std::mutex busy_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> active_{0};
  std::atomic<bool> open_{false};
  struct alignas(64) Region {  // a cache line each: the threads' counters do not share one
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::vector<Region> regions_;  // one per thread, the caller's first
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
};

// fn(begin, end) over [0, n) in chunks of at least `grain` items, about kChunksPerThread per
// thread of torch's thread count, claimed dynamically (all on the caller inside an OpenMP region
// or when n < 2 * grain).
constexpr int64_t kChunksPerThread = 4;

// How parallel_for splits n items: the chunk size, or 0 when it runs them all on the caller.
inline int64_t chunk_size(int64_t n, int64_t grain, int threads) {
  if (n <= 0 || threads <= 1 || n < 2 * grain) return 0;
  return std::max<int64_t>(std::max<int64_t>(1, grain),
                           (n + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
}

// The first item that the calling pool thread's own region will hold in a parallel_for over n
// items with this grain (what a kernel running now may prefetch for that call). The thread
// count is the pool's, which is torch's from the caller (a pool thread's own OpenMP setting
// need not be).
inline int64_t first_item_of_own_region(int64_t n, int64_t grain) {
  const int64_t size = chunk_size(n, grain, chunk_place.regions);
  if (size == 0) return 0;
  const int64_t chunks = (n + size - 1) / size;
  return region_begin(chunks, chunk_place.own_region, chunk_place.regions) * size;
}

template <class F>
void parallel_for(int64_t n, int64_t grain, const F& fn) {
  if (n <= 0) return;
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t size = chunk_size(n, grain, threads);
  if (size == 0) {
    fn(int64_t{0}, n);
    return;
  }
  struct Ctx {
    const F* fn;
    int64_t n, size;
  } ctx{&fn, n, size};
  Pool::get(threads).run(
      [](const void* raw, int64_t chunk) {
        const Ctx& c = *static_cast<const Ctx*>(raw);
        (*c.fn)(chunk * c.size, std::min(c.n, (chunk + 1) * c.size));
      },
      &ctx, (n + size - 1) / size);
}

}  // namespace cpu_pool
