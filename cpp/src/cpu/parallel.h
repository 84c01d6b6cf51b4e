// ThreadPool: a small persistent pool of std::threads with a blocking parallel_for. The calling
// thread works too (it is thread 0), chunks of `grain` indices are handed out dynamically, and
// the first exception thrown by a chunk is rethrown in the caller. One pool per CpuBackend;
// a nested or concurrent parallel_for on a busy pool runs inline in its calling thread.
// Chunks go out per thread in contiguous shares, with stealing (ChunkRange below).
// Idle threads poll for the next job only inside a forward pass (set_forward_pass(); the backend's
// isolated region) and sleep at once outside it; see parallel.cpp for the policy.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace lserve::cpu {

class ThreadPool {
 public:
  // num_threads <= 0 picks std::thread::hardware_concurrency().
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(chunk_begin, chunk_end, thread_idx) over [begin, end) in chunks of at most `grain`
  // indices, thread_idx in [0, num_threads()) naming the thread (for per-thread scratch). Ranges
  // of at most `grain` indices run inline. Returns when every chunk has finished.
  template <typename Fn>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, Fn&& fn) {
    if (end <= begin) return;
    if (grain < 1) grain = 1;
    const auto body = [](const void* context, int64_t chunk_begin, int64_t chunk_end, int thread_idx) {
      (*static_cast<const std::remove_reference_t<Fn>*>(context))(chunk_begin, chunk_end, thread_idx);
    };
    run(begin, end, grain, body, &fn);
  }

  // Number of chunks parallel_for would create: a helper for picking grains.
  static int64_t num_chunks(int64_t count, int64_t grain) { return (count + grain - 1) / grain; }

  // A forward pass starts (true) or ends (false): jobs come in a burst between the two, so idle
  // threads poll for the next one (unless the host is busy, or LSERVE_CPU_SPIN_US says otherwise).
  // Called by the thread that submits the jobs.
  void set_forward_pass(bool running);
  // The polling policy in words, for the backend's name (e.g. "polls 30 us in a forward pass on a quiet host").
  std::string polling_policy() const;

 private:
  using Body = void (*)(const void* context, int64_t chunk_begin, int64_t chunk_end, int thread_idx);

  void run(int64_t begin, int64_t end, int64_t grain, Body body, const void* context);
  void worker_loop(int thread_idx);
  void work_on_job(int thread_idx);

  int num_threads_ = 1;
  std::vector<std::thread> workers_;

  std::mutex dispatch_mutex_;  // held by the one caller whose job the workers run

  // How long an idle thread polls before blocking, within the current forward pass: 0 outside one.
  bool polling() const { return polling_.load(std::memory_order_relaxed); }
  int64_t poll_microseconds() const { return polling() ? poll_budget_us_ : 0; }

  // LSERVE_CPU_SPIN_US: an explicit budget (0: never poll) that also turns the busy-host check off;
  // -1 when unset (the default budget, with the check).
  const int64_t spin_override_us_;
  const int64_t poll_budget_us_;
  std::atomic<bool> polling_{false};  // inside a forward pass, and the host quiet (or overridden)
  // The busy-host check (set_forward_pass's thread only): the process's involuntary context
  // switches and the time when the current forward pass started; whether the last one ran quiet
  // (the first pass does not poll).
  int64_t pass_preemptions_ = -1;
  int64_t pass_start_us_ = 0;
  bool host_quiet_ = false;

  std::mutex state_mutex_;
  std::condition_variable job_ready_;
  std::condition_variable job_done_;
  // Bumped per job (release, after the job's fields are written, under state_mutex_); workers
  // wait for a change.
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> num_busy_workers_{0};
  std::atomic<bool> caller_sleeping_{false};  // the caller waits on job_done_
  std::atomic<bool> stopping_{false};

  // The current job (valid while a caller holds dispatch_mutex_).
  Body body_ = nullptr;
  const void* context_ = nullptr;
  int64_t end_ = 0;
  int64_t grain_ = 1;
  int64_t begin_ = 0;
  std::exception_ptr error_;

  // Chunks are handed out from one share per thread: share t is the t-th contiguous run of the
  // job's chunks; a thread takes its own front to back, then takes the others' from their backs.
  // So each thread streams through one contiguous range of the data, and a late or slow thread
  // still loses its work to the others. (One counter for all, the chunks alternated between the
  // threads: a decode step's weight matrices streamed ~6 % slower, 2026-12-05.)
  class alignas(64) ChunkRange {
   public:
    void store(int64_t first, int64_t last) {
      bounds_.store(static_cast<uint64_t>(last) << 32 | static_cast<uint64_t>(first), std::memory_order_relaxed);
    }
    // A chunk index from the front (or the back), or -1 when the share is empty.
    int64_t claim(bool front);

   private:
    std::atomic<uint64_t> bounds_{0};  // first chunk | one past the last << 32
  };
  std::unique_ptr<ChunkRange[]> ranges_;  // (num_threads_,)
};

}  // namespace lserve::cpu
