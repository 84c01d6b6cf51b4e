// Engine: the C++ serving loop, usable without Python (token ids in, token ids out).
// It owns the backend, the model, the paged KV cache manager and the scheduler. add_request()
// queues a prompt; each step() schedules one continuous batch (decodes + prefill chunks), runs
// the model once, samples, and returns every request's new tokens. Python's lserve.Engine wraps
// it with tokenization, detokenization and stop strings (python/lserve/engine.py).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "lserve/backend.h"
#include "lserve/kv/page_pool.h"
#include "lserve/kv/page_selector.h"
#include "lserve/model/config.h"
#include "lserve/model/llama.h"
#include "lserve/sampling.h"
#include "lserve/scheduler.h"
#include "lserve/sparsity.h"

namespace lserve {

struct EngineConfig {
  std::string device = "cpu";             // cpu | cuda | cuda:N
  // Weights: float32 | bfloat16 | float16, or native (CPU only): each weight matrix kept in the dtype
  // it is loaded in, ggml block formats included (a GGUF file's q4_1 stays q4_1; see LlamaModel).
  std::string dtype = "float32";
  std::string kv_cache_dtype = "float32";  // float32 | bfloat16
  int max_model_len = 0;                   // 0: the model's max_position_embeddings
  int max_num_seqs = 256;
  int max_num_batched_tokens = 2048;
  int64_t kv_cache_memory = 0;             // bytes for the KV cache; 0: see gpu_memory_utilization
  // 0 < x <= 1: on a GPU with kv_cache_memory == 0, the KV cache takes what is left of this fraction
  // of the device's memory after weights, other processes and the step buffers; on the CPU the
  // default is 1 GiB. Either way no more than max_num_seqs sequences of max_model_len need.
  double gpu_memory_utilization = 0.9;
  // Decode steps replay CUDA graphs captured at finalize() (dense or sparse, on a backend with graphs);
  // true runs every step eagerly.
  bool enforce_eager = false;
  int num_kv_pages = 0;                    // overrides kv_cache_memory when > 0
  int page_size = 16;
  int num_threads = 0;                     // CPU threads; 0: all cores
  int64_t seed = 0;                        // draws the seeds of requests that carry none
  bool capture_logits = false;             // return the logits of every sampled row (tests)
  std::vector<int32_t> eos_token_ids;      // empty: the model config's eos_token_id
  SparsityConfig sparsity;                 // enabled: LServe sparse attention (page_size = physical_page_size)
  // Automatic prefix caching (kv/page_pool.h): full pages of computed tokens stay cached and a new
  // request computes only what is not. With sparse attention the streaming heads' K/V of cached
  // pages is kept in the page selector's shadow pages (1/32 of the KV budget after the rings).
  bool enable_prefix_caching = true;

  void validate() const;
  bool native_weights() const { return dtype == "native"; }
};

struct TokenLogprob {
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top_logprobs;
};

// What step() returns for one request: the tokens it gained this step and, at the end, why.
struct RequestOutput {
  int64_t request_id = 0;
  std::vector<int32_t> new_token_ids;
  std::vector<TokenLogprob> new_logprobs;  // one per new token when params.logprobs is set
  bool finished = false;
  std::string finish_reason;  // "", "stop", "length", "abort"
  std::string error;          // why the engine aborted the request (e.g. NaN logits); "" otherwise
  int64_t num_prompt_tokens = 0;
  int64_t num_output_tokens = 0;
  int64_t num_cached_tokens = 0;  // prompt tokens that came from the prefix cache (or a sibling sample)
  std::vector<float> logits;  // (vocab_size,) when capture_logits, for the sampled row
};

struct EngineStats {
  int num_running = 0;
  int num_waiting = 0;
  int num_total_pages = 0;
  int num_free_pages = 0;
  int page_size = 0;
  int64_t num_preemptions = 0;
  int64_t num_steps = 0;
  // KV memory in bytes: dense pages plus, with sparse attention, the streaming heads' tiers.
  int64_t kv_cache_bytes = 0;
  int64_t kv_cache_bytes_in_use = 0;
  // Sparse attention (kv/page_selector.h): decode slots (one per running sequence, constant bytes
  // each: streaming_bytes_per_seq), prefill rings (held while a long prompt prefills), their bytes,
  // and the dense heads' pages read in the last step (summed over layers and heads) next to the
  // pages dense attention would have read.
  int num_stream_slots = 0;
  int num_free_stream_slots = 0;
  int num_prefill_rings = 0;
  int num_free_prefill_rings = 0;
  int64_t streaming_bytes_per_seq = 0;
  int64_t streaming_kv_bytes = 0;      // slots, rings and (prefix caching) shadow pages
  int num_shadow_pages = 0;            // the streaming heads' pages of cached prefixes (kv/page_selector.h)
  int64_t streaming_kv_bytes_in_use = 0;
  int64_t last_step_pages_selected = 0;
  int64_t last_step_pages_total = 0;
  // CUDA graphs: the decode batch sizes captured (empty: none) and the steps that replayed one.
  std::vector<int> graph_batch_sizes;
  int64_t num_graph_replays = 0;
  // Prefix caching: on or off, pages cached (evictable ones included), tokens
  // looked up and found at admission; prompt tokens computed by the model (a prefix hit or a forked
  // sample computes fewer) and samples forked from a sibling's prefill (add_request_group).
  bool prefix_caching = false;
  int num_cached_pages = 0;
  int64_t prefix_cache_queries = 0;
  int64_t prefix_cache_hits = 0;
  int64_t num_prompt_tokens_computed = 0;
  int64_t num_forked_samples = 0;
  // Allocations, copies or synchronisations inside the model's per-layer work so far (STYLE.md 2b;
  // Backend::begin_isolated): zero on the CPU; a device counts its first-step workspace growth.
  int64_t isolation_violations = 0;
  // Native weights (dtype "native") used in place inside the model file's mapping, no copy made:
  // whole matrices the serving layout leaves as stored and the backend does not pack (ARCHITECTURE.md,
  // "Quantized GEMM on the CPU").
  int64_t weight_bytes_mapped = 0;
  // Native weights the backend holds in its own gemm layout (Backend::pack_gemm_weight; the CPU packs
  // block formats), counted as their stored bytes.
  int64_t weight_bytes_packed = 0;
};

class Engine {
 public:
  Engine(const ModelConfig& model_config, const EngineConfig& config);
  // Loads a GGUF file's config and weights (llama architecture).
  static std::unique_ptr<Engine> from_gguf(const std::string& path, EngineConfig config);

  const ModelConfig& model_config() const { return model_->config(); }
  const EngineConfig& config() const { return config_; }

  // Weight loading (Hugging Face names), then finalize() checks completeness and allocates the
  // KV cache. Requests are accepted only after finalize().
  // `mapping`, when given, owns tensor's memory (a GGUF mapping, GgufFile::mapping()): native
  // weights that need no copy keep a view into it instead of copying (returns true then).
  bool load_weight(const std::string& name, const TensorView& tensor,
                   const std::shared_ptr<const void>& mapping = nullptr);
  void finalize();
  bool ready() const { return ready_; }

  // Queues a request; raises lserve::Error (and queues nothing) for an empty prompt, a prompt of
  // max_model_len tokens or more, token ids outside the vocabulary, invalid params or a reused id.
  void add_request(int64_t request_id, const std::vector<int32_t>& prompt_token_ids, const SamplingParams& params);
  // n samples of one prompt (n = request_ids.size(), one SamplingParams each, e.g. their own seeds):
  // the prompt is prefilled once, by the first; when it samples its first token, the others sample
  // theirs from the same logits and continue on its pages (full pages shared, the partial last page
  // and, with sparsity, the streaming heads' slot copied). A sample that cannot be forked then (no
  // free page, slot or sequence) runs as an ordinary request. Checks as add_request, for every id.
  void add_request_group(const std::vector<int64_t>& request_ids, const std::vector<int32_t>& prompt_token_ids,
                         const std::vector<SamplingParams>& params);
  // True when the request existed; its pages are freed and step() reports it finished ("abort").
  bool abort_request(int64_t request_id);
  // Forgets every cached prefix page (requests in flight keep theirs); no-op without prefix caching.
  void reset_prefix_cache();
  // Replaces a sparse engine's decode-time page selection settings between requests: the fields
  // SparsityConfig::layout_difference leaves out (budgets, recent tokens, reuse interval, scores);
  // the rest must equal the engine's, as they size memory and shape prefill. The prefix cache stays,
  // so a prompt run before is not prefilled again: several selection policies can be compared on the
  // same prompts for the cost of their decodes. lserve::Error (nothing changed) for a dense engine,
  // another field changed, a request in flight, or the CUDA backend (its decode graphs capture the
  // selection settings).
  void set_decode_sparsity(const SparsityConfig& sparsity);
  std::vector<RequestOutput> step();
  bool has_unfinished_requests() const;
  EngineStats stats() const;

  // Convenience for C++ callers: runs every prompt to completion, outputs in prompt order.
  std::vector<std::vector<int32_t>> generate(const std::vector<std::vector<int32_t>>& prompts,
                                             const SamplingParams& params);

 private:
  bool is_eos(int32_t token_id) const;
  void check_new_request(int64_t request_id, const std::vector<int32_t>& prompt_token_ids,
                         const SamplingParams& params) const;
  std::unique_ptr<Request> make_request(int64_t request_id, const std::vector<int32_t>& prompt_token_ids,
                                        const SamplingParams& params);
  // Appends a sampled token to `request` and fills `output`; finishes the request (pages freed)
  // when it stops.
  void accept_token(Request& request, SampledToken sampled, RequestOutput& output);
  // Moves `follower` onto `leader`'s pages after the leader's prefill; false (nothing taken) when
  // pages, a streaming slot or a running place are missing.
  bool fork_sample(const Request& leader, std::unique_ptr<Request>& follower);
  // Hands the samples waiting for leader_id to the scheduler as ordinary requests.
  void release_followers(int64_t leader_id);
  // One sampling row: a request and the row of the step's logits it samples from (the samples a
  // group forks this step share their leader's row).
  struct SampleRow {
    Request* request = nullptr;
    int32_t logits_row = 0;
  };
  // What sample_rows brings back to the host: per row the token (-1: the sampler found the row
  // invalid) and, when some row asks for logprobs, the chosen token's and the num_top best.
  struct SampledRows {
    std::vector<int32_t> token_ids;     // (num_rows,)
    std::vector<float> logprobs;        // (num_rows,), or empty
    std::vector<int32_t> top_token_ids;  // (num_rows, num_top), or empty
    std::vector<float> top_logprobs;     // (num_rows, num_top), or empty
    int num_top = 0;
  };
  // Samples every row with Backend::sample (on every backend: one sampler) and, when a row asks
  // for them, computes logprobs with Backend::logprobs from the same raw logits; one host copy back.
  // `logits` (num_logits_rows, vocab_size) on the backend is scratch unless rows share a logits row
  // or logprobs are wanted (then the sampler works on a gathered copy).
  SampledRows sample_rows(const std::vector<SampleRow>& rows, const TensorView& logits);

  EngineConfig config_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<KvCacheManager> kv_cache_;
  std::unique_ptr<PageSelector> selector_;  // sparse attention only
  ForwardBatch batch_;                      // the step's metadata, host buffers reserved at finalize()
  int64_t dense_page_bytes_ = 0;
  std::unique_ptr<Scheduler> scheduler_;
  std::vector<int32_t> eos_token_ids_;
  std::mt19937_64 seed_rng_;
  std::vector<RequestOutput> pending_aborts_;
  // Samples waiting for their first sibling's prefill (add_request_group), by that sibling's id.
  std::unordered_map<int64_t, std::vector<std::unique_ptr<Request>>> followers_;
  std::vector<NamedPage> named_pages_;  // pages the last commit named (sparse: their shadows are made)
  int64_t prefix_cache_queries_ = 0, prefix_cache_hits_ = 0, num_prompt_tokens_computed_ = 0, num_forked_ = 0;
  int64_t num_preemptions_ = 0;
  int64_t num_steps_ = 0;
  bool ready_ = false;
  mutable std::mutex mutex_;  // add/abort may come from other threads than step()
};

}  // namespace lserve
