// ThreadPool implementation: workers sleep on a condition variable between jobs, take chunks from
// per-thread shares (stealing from the others' ends once theirs is empty), and report completion.
// Polling policy (llama.cpp's threads likewise spin between the ops of one graph and sleep between
// graphs): inside a forward pass, where a decode step submits ~150 jobs a few microseconds apart,
// idle workers and a caller waiting for them poll up to kStepPollMicroseconds (with `pause`) before
// sleeping, which saves a futex sleep and wake per job; outside one they sleep at once. On a busy
// host polling made decode 2-3x slower (a spinning thread holds a CPU that the thread it waits for
// needs; docs/PERFORMANCE.md), so a forward pass polls only when the previous one saw few
// involuntary context switches in this process (a quiet host: < 1 per decode step; with two other
// busy processes on the 2-core VM: 100-160). LSERVE_CPU_SPIN_US=N overrides: poll N us inside
// forward passes whatever the load, 0: never.
#include "parallel.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <string>

#include <sys/resource.h>

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

// Polls done() for up to `microseconds` (0: not at all) while keep_polling() holds; true as soon as
// done() holds.
template <typename Done, typename KeepPolling>
bool spin_until(Done&& done, int64_t microseconds, KeepPolling&& keep_polling) {
  if (microseconds <= 0) return done();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(microseconds);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (!keep_polling() || std::chrono::steady_clock::now() >= deadline) return done();
  }
}

// The default budget. A decode step's gaps between jobs are a few microseconds (the caller's
// inline norms, rope, activation quantisation), so 30 us covers them; on the quiet 2-core VM it
// decoded as fast as 100 us (alternated, 78-84 vs 56-78 tokens/s at batch 1, 2026-12-05), and a
// thread that shares its CPU with the one it waits for (a placement seen beside busy processes,
// with few preemptions, so the check below does not see it) wastes a third as much per wait.
constexpr int64_t kStepPollMicroseconds = 30;
// A forward pass polls when during the previous one the process was preempted at most
// kQuietPreemptions times, plus one per kQuietMicrosecondsPerPreemption of its duration.
constexpr int64_t kQuietPreemptions = 4;
constexpr int64_t kQuietMicrosecondsPerPreemption = 2000;

int64_t now_microseconds() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t involuntary_context_switches() {
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return -1;
  return usage.ru_nivcsw;
}

// -1 when LSERVE_CPU_SPIN_US is unset.
int64_t spin_override_from_env() {
  const char* text = std::getenv("LSERVE_CPU_SPIN_US");
  if (text == nullptr || *text == '\0') return -1;
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  LSERVE_CHECK(end != text && *end == '\0' && value >= 0 && value <= 1000000, "LSERVE_CPU_SPIN_US must be an ",
               "integer number of microseconds in [0, 1000000], got '", text, "'");
  return value;
}

}  // namespace

namespace lserve::cpu {

ThreadPool::ThreadPool(int num_threads)
    : spin_override_us_(spin_override_from_env()),
      poll_budget_us_(spin_override_us_ >= 0 ? spin_override_us_ : kStepPollMicroseconds) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  num_threads_ = std::max(1, num_threads);
  ranges_ = std::make_unique<ChunkRange[]>(num_threads_);
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

void ThreadPool::set_forward_pass(bool running) {
  if (poll_budget_us_ == 0 || workers_.empty()) return;
  if (spin_override_us_ >= 0) {
    polling_.store(running, std::memory_order_relaxed);
    return;
  }
  const int64_t preemptions = involuntary_context_switches(), now_us = now_microseconds();
  if (running) {
    pass_preemptions_ = preemptions;
    pass_start_us_ = now_us;
    polling_.store(host_quiet_, std::memory_order_relaxed);
    return;
  }
  polling_.store(false, std::memory_order_relaxed);
  host_quiet_ = preemptions >= 0 && pass_preemptions_ >= 0 &&
                preemptions - pass_preemptions_ <=
                    kQuietPreemptions + (now_us - pass_start_us_) / kQuietMicrosecondsPerPreemption;
}

std::string ThreadPool::polling_policy() const {
  if (workers_.empty() || poll_budget_us_ == 0) return "never polls";
  return "polls " + std::to_string(poll_budget_us_) + " us in a forward pass" +
         (spin_override_us_ >= 0 ? "" : " on a quiet host");
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
    begin_ = begin;
    end_ = end;
    grain_ = grain;
    const int64_t num_chunks = ThreadPool::num_chunks(end - begin, grain);
    LSERVE_CHECK(num_chunks <= std::numeric_limits<uint32_t>::max(), "parallel_for: ", num_chunks, " chunks");
    for (int thread_idx = 0; thread_idx < num_threads_; ++thread_idx) {
      ranges_[thread_idx].store(num_chunks * thread_idx / num_threads_, num_chunks * (thread_idx + 1) / num_threads_);
    }
    error_ = nullptr;
    num_busy_workers_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  job_ready_.notify_all();
  work_on_job(0);
  const auto all_done = [this] { return num_busy_workers_.load() == 0; };  // seq_cst: see caller_sleeping_
  if (!spin_until(all_done, poll_microseconds(), [this] { return polling(); })) {
    std::unique_lock<std::mutex> lock(state_mutex_);
    caller_sleeping_.store(true);  // seq_cst, as the last worker's decrement and load: one sees the other
    job_done_.wait(lock, all_done);
    caller_sleeping_.store(false, std::memory_order_relaxed);
  }
  // Every worker is done with the job (all_done synchronises with their decrements): its fields are
  // the caller's again.
  const std::exception_ptr error = std::move(error_);
  error_ = nullptr;
  body_ = nullptr;
  context_ = nullptr;
  if (error) std::rethrow_exception(error);
}

int64_t ThreadPool::ChunkRange::claim(bool front) {
  uint64_t bounds = bounds_.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t first = bounds & 0xffffffffu, last = bounds >> 32;
    if (first >= last) return -1;
    const uint64_t claimed = front ? bounds + 1 : bounds - (uint64_t{1} << 32);
    if (bounds_.compare_exchange_weak(bounds, claimed, std::memory_order_relaxed)) {
      return static_cast<int64_t>(front ? first : last - 1);
    }
  }
}

void ThreadPool::work_on_job(int thread_idx) {
  const auto run_chunk = [&](int64_t chunk) {
    const int64_t chunk_begin = begin_ + chunk * grain_;
    try {
      body_(context_, chunk_begin, std::min(end_, chunk_begin + grain_), thread_idx);
    } catch (...) {
      std::lock_guard<std::mutex> lock(state_mutex_);
      if (!error_) error_ = std::current_exception();
      for (int t = 0; t < num_threads_; ++t) ranges_[t].store(0, 0);  // stop handing out chunks
    }
  };
  // Its own share front to back (one stream through memory), then the others' from their ends.
  for (int offset = 0; offset < num_threads_; ++offset) {
    ChunkRange& range = ranges_[(thread_idx + offset) % num_threads_];
    for (int64_t chunk; (chunk = range.claim(offset == 0)) >= 0;) run_chunk(chunk);
  }
}

void ThreadPool::worker_loop(int thread_idx) {
  uint64_t seen_generation = 0;
  for (;;) {
    const auto has_job = [&] {
      return stopping_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen_generation;
    };
    if (!spin_until(has_job, poll_microseconds(), [this] { return polling(); })) {
      std::unique_lock<std::mutex> lock(state_mutex_);
      job_ready_.wait(lock, has_job);
    }
    if (stopping_.load(std::memory_order_acquire)) return;
    seen_generation = generation_.load(std::memory_order_acquire);
    work_on_job(thread_idx);
    // The last worker wakes a sleeping caller, under the lock: a caller that found the count
    // non-zero is then already waiting. A polling caller is not sleeping and sees the 0 itself;
    // taking the lock anyway made it sleep on the mutex while this thread held it.
    if (num_busy_workers_.fetch_sub(1) == 1 && caller_sleeping_.load()) {
      std::lock_guard<std::mutex> lock(state_mutex_);
      job_done_.notify_one();
    }
  }
}

}  // namespace lserve::cpu
