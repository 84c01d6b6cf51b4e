// Request and Scheduler: continuous batching with chunked prefill (vLLM V1's token-budget
// scheme). Each step, running requests get their next tokens first (one for decodes, a chunk for
// unfinished prefills), then waiting requests are admitted while the token budget,
// max_num_seqs and free KV pages allow. When pages run out, the most recently admitted request
// is preempted: its pages are released and it is recomputed later from its tokens so far.
// With prefix caching (kv/page_pool.h), a request that starts from position 0 first maps the longest
// cached run of its full pages and computes only the rest; each commit names the pages it filled.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "lserve/kv/page_pool.h"
#include "lserve/kv/page_selector.h"
#include "lserve/sampling.h"

namespace lserve {

enum class RequestStatus { kWaiting, kRunning, kFinished };
enum class FinishReason { kNone, kStop, kLength, kAbort };
const char* finish_reason_name(FinishReason reason);  // "", "stop", "length", "abort"

struct Request {
  int64_t request_id = 0;
  std::vector<int32_t> prompt_token_ids;
  std::vector<int32_t> output_token_ids;
  SamplingParams params;
  uint64_t sample_seed = 0;  // the sample op's Philox key (params.seed, or drawn from the engine's generator);
                             // the counter is output_token_ids.size()
  RequestStatus status = RequestStatus::kWaiting;
  FinishReason finish_reason = FinishReason::kNone;
  int64_t num_computed_tokens = 0;  // tokens whose K/V are in the cache
  int64_t num_cached_tokens = -1;   // prompt tokens found in the prefix cache at first admission (-1: not yet)
  int num_preemptions = 0;

  int64_t num_tokens() const {
    return static_cast<int64_t>(prompt_token_ids.size() + output_token_ids.size());
  }
  TokenRuns tokens() const {
    return {prompt_token_ids.data(), static_cast<int64_t>(prompt_token_ids.size()), output_token_ids.data(),
            static_cast<int64_t>(output_token_ids.size())};
  }
  int32_t token_at(int64_t position) const {
    const int64_t num_prompt = static_cast<int64_t>(prompt_token_ids.size());
    return position < num_prompt ? prompt_token_ids[position] : output_token_ids[position - num_prompt];
  }
};

struct SchedulerConfig {
  int max_num_seqs = 256;
  int max_num_batched_tokens = 2048;
  int max_model_len = 2048;
};

struct ScheduledChunk {
  Request* request = nullptr;
  int64_t start_position = 0;  // == request->num_computed_tokens when scheduled
  int64_t num_new_tokens = 0;
  bool samples = false;        // the chunk reaches the request's last token: sample after it
};

struct SchedulerOutput {
  std::vector<ScheduledChunk> chunks;
  int64_t num_tokens = 0;
  std::vector<int64_t> preempted_request_ids;
  // Prefix caching, over the requests admitted this step: tokens looked up and tokens found cached.
  int64_t prefix_cache_queries = 0;
  int64_t prefix_cache_hits = 0;
  // With sparse attention: (request id, tokens taken from the cache) of each hit this step, whose
  // streaming state the engine restores from the page selector's shadows before the forward pass.
  std::vector<std::pair<int64_t, int64_t>> restores;
};

class Scheduler {
 public:
  // selector: the sparse-attention state (streaming slots, prefill rings), or nullptr.
  Scheduler(const SchedulerConfig& config, KvCacheManager& kv_cache, PageSelector* selector = nullptr);

  void add_request(std::unique_ptr<Request> request);
  // Adds a request that already holds its pages (and sparse state) and has computed
  // num_computed_tokens tokens, as running (a forked sample of a prompt: Engine::add_request_group).
  // False (nothing taken) when max_num_seqs requests run already.
  bool add_running(std::unique_ptr<Request> request);
  // Removes a waiting or running request and frees its pages; returns it (finish reason abort),
  // or nullptr when the id is unknown.
  std::unique_ptr<Request> abort_request(int64_t request_id);
  SchedulerOutput schedule();
  // After the model ran `output`: advances computed-token counts and names the pages they filled
  // in the prefix cache (appended to `named` when given). Call finish_request for the requests
  // that stopped.
  void commit(const SchedulerOutput& output, std::vector<NamedPage>* named = nullptr);
  std::unique_ptr<Request> finish_request(int64_t request_id, FinishReason reason);

  int num_running() const { return static_cast<int>(running_.size()); }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  bool has_unfinished() const { return !running_.empty() || !waiting_.empty(); }
  bool contains(int64_t request_id) const;
  const SchedulerConfig& config() const { return config_; }

 private:
  void preempt(std::unique_ptr<Request> request, SchedulerOutput& output);
  // Grows the request's pages to num_tokens tokens and, with sparse attention, takes what the page
  // selector says it needs (a decode slot, a prefill ring for a long prompt); false (and no change)
  // when pages, slots or rings run out.
  bool reserve(const Request& request, int64_t num_tokens);
  void release(int64_t request_id);
  std::unique_ptr<Request> take(int64_t request_id);

  SchedulerConfig config_;
  KvCacheManager& kv_cache_;
  PageSelector* selector_;
  std::vector<std::unique_ptr<Request>> running_;  // admission order
  std::deque<std::unique_ptr<Request>> waiting_;   // preempted requests go to the front
};

}  // namespace lserve
