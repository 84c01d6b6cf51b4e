// ThreadPool implementation: workers sleep on a condition variable between jobs, take chunks from
// an atomic counter, and report completion. By default nothing spins (the host may be shared: on a
// loaded 2-core VM polling made decode 2-3x slower, docs/PERFORMANCE.md); LSERVE_CPU_SPIN_US=N lets
// idle workers, and a caller waiting for them, poll for up to N microseconds before sleeping, which
// saves a futex sleep and wake per job on a machine the engine has to itself (llama.cpp and OpenMP
// spin by default for the same reason).
#include "parallel.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "lserve/check.h"

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Polls done() for up to `microseconds` (0: not at all); true as soon as it holds.
template <typename Done>
bool spin_until(Done&& done, int64_t microseconds) {
  if (microseconds <= 0) return done();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(microseconds);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}

int64_t spin_microseconds_from_env() {
  const char* text = std::getenv("LSERVE_CPU_SPIN_US");
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  LSERVE_CHECK(end != text && *end == '\0' && value >= 0 && value <= 1000000, "LSERVE_CPU_SPIN_US must be an ",
               "integer number of microseconds in [0, 1000000], got '", text, "'");
  return value;
}

}  // namespace

namespace lserve::cpu {

ThreadPool::ThreadPool(int num_threads) : spin_microseconds_(spin_microseconds_from_env()) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  num_threads_ = std::max(1, num_threads);
  workers_.reserve(num_threads_ - 1);
  for (int thread_idx = 1; thread_idx < num_threads_; ++thread_idx) {
    workers_.emplace_back([this, thread_idx] { worker_loop(thread_idx); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    stopping_.store(true);
  }
  job_ready_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::run(int64_t begin, int64_t end, int64_t grain, Body body, const void* context) {
  std::unique_lock<std::mutex> dispatch(dispatch_mutex_, std::try_to_lock);
  if (workers_.empty() || end - begin <= grain || !dispatch.owns_lock()) {
    // Serial: a single thread, a single chunk, or a nested/concurrent call on a busy pool.
    for (int64_t chunk_begin = begin; chunk_begin < end; chunk_begin += grain) {
      body(context, chunk_begin, std::min(end, chunk_begin + grain), 0);
    }
    return;
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    body_ = body;
    context_ = context;
    end_ = end;
    grain_ = grain;
    next_.store(begin, std::memory_order_relaxed);
    error_ = nullptr;
    num_busy_workers_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  job_ready_.notify_all();
  work_on_job(0);
  const auto all_done = [this] { return num_busy_workers_.load(std::memory_order_acquire) == 0; };
  std::exception_ptr error;
  if (!spin_until(all_done, spin_microseconds_)) {
    std::unique_lock<std::mutex> lock(state_mutex_);
    job_done_.wait(lock, all_done);
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    error = error_;
    error_ = nullptr;
    body_ = nullptr;
    context_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

void ThreadPool::work_on_job(int thread_idx) {
  for (;;) {
    const int64_t chunk_begin = next_.fetch_add(grain_, std::memory_order_relaxed);
    if (chunk_begin >= end_) return;
    try {
      body_(context_, chunk_begin, std::min(end_, chunk_begin + grain_), thread_idx);
    } catch (...) {
      std::lock_guard<std::mutex> lock(state_mutex_);
      if (!error_) error_ = std::current_exception();
      next_.store(end_, std::memory_order_relaxed);  // stop handing out chunks
    }
  }
}

void ThreadPool::worker_loop(int thread_idx) {
  uint64_t seen_generation = 0;
  for (;;) {
    const auto has_job = [&] {
      return stopping_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen_generation;
    };
    if (!spin_until(has_job, spin_microseconds_)) {
      std::unique_lock<std::mutex> lock(state_mutex_);
      job_ready_.wait(lock, has_job);
    }
    if (stopping_.load(std::memory_order_acquire)) return;
    seen_generation = generation_.load(std::memory_order_acquire);
    work_on_job(thread_idx);
    if (num_busy_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Under the lock: a caller that found the count non-zero is already waiting, or will see 0.
      std::lock_guard<std::mutex> lock(state_mutex_);
      job_done_.notify_one();
    }
  }
}

}  // namespace lserve::cpu
