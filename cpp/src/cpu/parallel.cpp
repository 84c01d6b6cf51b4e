// ThreadPool implementation: workers sleep on a condition variable between jobs (no spinning:
// the host may be shared), take chunks from an atomic counter, and report completion.
#include "parallel.h"

#include <algorithm>

namespace lserve::cpu {

ThreadPool::ThreadPool(int num_threads) {
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
    stopping_ = true;
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
    num_busy_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  job_ready_.notify_all();
  work_on_job(0);
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(state_mutex_);
    job_done_.wait(lock, [this] { return num_busy_workers_ == 0; });
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
    {
      std::unique_lock<std::mutex> lock(state_mutex_);
      job_ready_.wait(lock, [&] { return stopping_ || generation_ != seen_generation; });
      if (stopping_) return;
      seen_generation = generation_;
    }
    work_on_job(thread_idx);
    bool last;
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      last = --num_busy_workers_ == 0;
    }
    if (last) job_done_.notify_one();
  }
}

}  // namespace lserve::cpu
