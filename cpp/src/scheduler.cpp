// Scheduler: token-budget continuous batching with chunked prefill and recompute preemption.
#include "lserve/scheduler.h"

#include <algorithm>
#include <functional>

#include "lserve/check.h"

namespace lserve {

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAbort: return "abort";
  }
  return "";
}

Scheduler::Scheduler(const SchedulerConfig& config, KvCacheManager& kv_cache, PageSelector* selector)
    : config_(config), kv_cache_(kv_cache), selector_(selector) {
  LSERVE_CHECK(config.max_num_seqs >= 1, "max_num_seqs must be >= 1, got ", config.max_num_seqs);
  LSERVE_CHECK(config.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1, got ",
               config.max_num_batched_tokens);
  LSERVE_CHECK(config.max_model_len >= 1, "max_model_len must be >= 1, got ", config.max_model_len);
}

bool Scheduler::contains(int64_t request_id) const {
  for (const auto& r : running_) if (r->request_id == request_id) return true;
  for (const auto& r : waiting_) if (r->request_id == request_id) return true;
  return false;
}

void Scheduler::add_request(std::unique_ptr<Request> request) {
  LSERVE_CHECK(!contains(request->request_id), "request id ", request->request_id, " is already in use");
  request->status = RequestStatus::kWaiting;
  waiting_.push_back(std::move(request));
}

bool Scheduler::add_running(std::unique_ptr<Request> request) {
  LSERVE_CHECK(!contains(request->request_id), "request id ", request->request_id, " is already in use");
  if (static_cast<int>(running_.size()) >= config_.max_num_seqs) return false;
  request->status = RequestStatus::kRunning;
  running_.push_back(std::move(request));
  return true;
}

std::unique_ptr<Request> Scheduler::take(int64_t request_id) {
  for (auto it = running_.begin(); it != running_.end(); ++it) {
    if ((*it)->request_id == request_id) {
      auto request = std::move(*it);
      running_.erase(it);
      return request;
    }
  }
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if ((*it)->request_id == request_id) {
      auto request = std::move(*it);
      waiting_.erase(it);
      return request;
    }
  }
  return nullptr;
}

bool Scheduler::reserve(const Request& request, int64_t num_tokens) {
  const bool new_seq = selector_ != nullptr && !selector_->has(request.request_id);
  // A sequence without sparse state prefills from position 0 (admission, or recompute).
  if (new_seq && !selector_->acquire(request.request_id, request.num_tokens())) return false;
  if (kv_cache_.reserve(request.request_id, num_tokens)) return true;
  if (new_seq) selector_->release(request.request_id);
  return false;
}

void Scheduler::release(int64_t request_id) {
  kv_cache_.release(request_id);
  if (selector_ != nullptr) selector_->release(request_id);
}

std::unique_ptr<Request> Scheduler::finish_request(int64_t request_id, FinishReason reason) {
  auto request = take(request_id);
  if (!request) return nullptr;
  release(request_id);
  request->status = RequestStatus::kFinished;
  request->finish_reason = reason;
  return request;
}

std::unique_ptr<Request> Scheduler::abort_request(int64_t request_id) {
  return finish_request(request_id, FinishReason::kAbort);
}

void Scheduler::preempt(std::unique_ptr<Request> request, SchedulerOutput& output) {
  release(request->request_id);
  request->num_computed_tokens = 0;
  request->status = RequestStatus::kWaiting;
  ++request->num_preemptions;
  output.preempted_request_ids.push_back(request->request_id);
  waiting_.push_front(std::move(request));
}

SchedulerOutput Scheduler::schedule() {
  SchedulerOutput output;
  int64_t budget = config_.max_num_batched_tokens;

  // 1. Running requests, oldest first; preempt the newest when pages run out.
  size_t index = 0;
  while (index < running_.size() && budget > 0) {
    Request* request = running_[index].get();
    const int64_t remaining = request->num_tokens() - request->num_computed_tokens;
    const int64_t num_new = std::min(remaining, budget);
    if (num_new <= 0) {  // nothing to do this step (cannot happen for an unfinished request)
      ++index;
      continue;
    }
    bool self_preempted = false;
    while (!reserve(*request, request->num_computed_tokens + num_new)) {
      auto victim = std::move(running_.back());
      running_.pop_back();
      self_preempted = victim.get() == request;
      preempt(std::move(victim), output);
      if (self_preempted) break;
    }
    if (self_preempted) break;
    output.chunks.push_back({request, request->num_computed_tokens, num_new,
                             request->num_computed_tokens + num_new == request->num_tokens()});
    budget -= num_new;
    ++index;
  }

  // 2. Waiting requests, in order, unless this step had to preempt.
  while (output.preempted_request_ids.empty() && !waiting_.empty() && budget > 0 &&
         static_cast<int>(running_.size()) < config_.max_num_seqs) {
    Request* request = waiting_.front().get();
    // A request that starts from scratch first takes what the prefix cache holds of it (whole pages,
    // leaving at least its last token to compute: the step needs its logits).
    int64_t matched = 0;
    if (request->num_computed_tokens == 0 && !kv_cache_.has(request->request_id)) {
      std::function<int(const std::vector<uint64_t>&)> usable;  // sparse: as far as shadows restore
      if (selector_ != nullptr) usable = [this](const auto& names) { return selector_->usable_prefix_pages(names); };
      matched = kv_cache_.match_prefix(request->request_id, request->tokens(), request->num_tokens() - 1, usable);
      request->num_computed_tokens = matched;
    }
    const int64_t num_new = std::min(request->num_tokens() - request->num_computed_tokens, budget);
    if (!reserve(*request, request->num_computed_tokens + num_new)) {
      if (matched > 0) {  // give the cached pages back: the request waits as it was
        kv_cache_.release(request->request_id);
        request->num_computed_tokens = 0;
      }
      break;
    }
    if (kv_cache_.prefix_caching()) {
      output.prefix_cache_queries += request->num_tokens();
      output.prefix_cache_hits += matched;
    }
    if (request->num_cached_tokens < 0) request->num_cached_tokens = matched;
    if (matched > 0 && selector_ != nullptr) output.restores.emplace_back(request->request_id, matched);
    request->status = RequestStatus::kRunning;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    output.chunks.push_back({request, request->num_computed_tokens, num_new,
                             request->num_computed_tokens + num_new == request->num_tokens()});
    budget -= num_new;
  }
  output.num_tokens = config_.max_num_batched_tokens - budget;
  return output;
}

void Scheduler::commit(const SchedulerOutput& output, std::vector<NamedPage>* named) {
  for (const ScheduledChunk& chunk : output.chunks) {
    Request& request = *chunk.request;
    request.num_computed_tokens = chunk.start_position + chunk.num_new_tokens;
    kv_cache_.cache_full_pages(request.request_id, request.tokens(), request.num_computed_tokens, named);
  }
}

}  // namespace lserve
