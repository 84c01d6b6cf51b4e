// Engine: request admission, the step loop (schedule -> batch metadata -> forward -> sample ->
// stop checks), and statistics.
#include "lserve/engine.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <sstream>
#include <string>

#include "lserve/packed_upload.h"

namespace lserve {

namespace {

constexpr int64_t kCpuDefaultKvBytes = int64_t{1} << 30;  // the KV budget on the CPU without kv_cache_memory

// Bytes this process could hold on the host: physical memory, capped by an address-space limit.
int64_t host_memory_limit() {
  int64_t limit = std::numeric_limits<int64_t>::max();
  const long num_pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_bytes = ::sysconf(_SC_PAGE_SIZE);
  if (num_pages > 0 && page_bytes > 0) limit = static_cast<int64_t>(num_pages) * page_bytes;
  struct rlimit address_space;
  if (::getrlimit(RLIMIT_AS, &address_space) == 0 && address_space.rlim_cur != RLIM_INFINITY) {
    limit = std::min<int64_t>(limit, static_cast<int64_t>(address_space.rlim_cur));
  }
  return limit;
}

// Refuses, before anything is allocated, a model and max_model_len that cannot fit: the weights and
// the rotary table must fit the device's memory (on the CPU the host's memory and address-space
// limit), and, with dense attention, the KV cache of one max_model_len sequence must fit the largest
// budget finalize() could find (its own rule, checked again there with the real budget). A corrupt
// model file thus fails with the size named instead of an allocation failure midway.
void check_fits_memory(const ModelConfig& model, const EngineConfig& config, Backend& backend) {
  const int64_t device_total = backend.memory_info().second;
  const bool on_host = device_total <= 0;
  const int64_t memory = on_host ? host_memory_limit() : device_total;
  const char* where = on_host ? "the host" : "the device";
  // Native weights take at least q4_0's 18 bytes per 32 items: the bound refuses only what cannot fit.
  const DType weight_dtype = config.native_weights() ? DType::kQ4_0 : dtype_from_string(config.dtype);
  const int64_t weight_bytes = LlamaModel::weight_bytes(model, weight_dtype);
  const int64_t rope_bytes = LlamaModel::rope_table_bytes(model, config.max_model_len);
  LSERVE_CHECK(weight_bytes <= memory, "the model's weights need ", weight_bytes, " bytes as ", config.dtype,
               " (", model.num_layers, " layers, hidden size ", model.hidden_size, ", vocabulary ", model.vocab_size,
               "), more than the ", memory, " bytes ", where, " has");
  LSERVE_CHECK(rope_bytes <= memory - weight_bytes, "max_model_len = ", config.max_model_len, " needs a ", rope_bytes,
               "-byte rotary table beside ", weight_bytes, " bytes of weights, more than the ", memory, " bytes ",
               where, " has: lower max_model_len");
  if (config.sparsity.enabled) return;  // streaming heads hold fewer tokens: finalize() decides
  const int64_t pages_per_seq = (static_cast<int64_t>(config.max_model_len) + config.page_size - 1) / config.page_size;
  const int64_t token_bytes = 2LL * model.num_layers * model.num_kv_heads * model.head_dim *
                              static_cast<int64_t>(dtype_size(dtype_from_string(config.kv_cache_dtype)));
  const int64_t page_bytes = std::max<int64_t>(1, token_bytes * config.page_size);
  int64_t max_pages;
  const char* remedy = "raise kv_cache_memory or lower max_model_len";
  if (config.num_kv_pages > 0) {
    max_pages = config.num_kv_pages;
    remedy = "raise num_kv_pages or lower max_model_len";
  } else if (config.kv_cache_memory > 0) {
    max_pages = config.kv_cache_memory / page_bytes;
  } else if (!on_host) {
    max_pages = static_cast<int64_t>(config.gpu_memory_utilization * static_cast<double>(device_total)) / page_bytes;
    remedy = "raise gpu_memory_utilization or lower max_model_len";
  } else {
    max_pages = kCpuDefaultKvBytes / page_bytes;
  }
  LSERVE_CHECK(max_pages >= pages_per_seq, "the KV cache can hold at most ", max_pages * config.page_size,
               " tokens (", max_pages, " pages of ", config.page_size, " tokens, ", page_bytes,
               " bytes each), fewer than max_model_len = ", config.max_model_len, ": ", remedy);
}

}  // namespace

void EngineConfig::validate() const {
  LSERVE_CHECK(max_model_len >= 0, "max_model_len must be >= 0 (0 = the model's), got ", max_model_len);
  LSERVE_CHECK(max_num_seqs >= 1, "max_num_seqs must be >= 1, got ", max_num_seqs);
  LSERVE_CHECK(max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1, got ", max_num_batched_tokens);
  LSERVE_CHECK(kv_cache_memory >= 0, "kv_cache_memory must be >= 0 bytes, got ", kv_cache_memory);
  LSERVE_CHECK(num_kv_pages >= 0, "num_kv_pages must be >= 0, got ", num_kv_pages);
  LSERVE_CHECK(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0,
               "gpu_memory_utilization must be in (0, 1], got ", gpu_memory_utilization);
  LSERVE_CHECK(page_size >= 1 && page_size <= 1024, "page_size must be in [1, 1024], got ", page_size);
  if (!native_weights()) {
    const DType weights = dtype_from_string(dtype);
    LSERVE_CHECK(weights == DType::kF32 || weights == DType::kBF16 || weights == DType::kF16,
                 "dtype must be float32, bfloat16, float16 or native, got ", dtype);
  } else {
    LSERVE_CHECK(device == "cpu", "dtype native (weights as stored, e.g. q4_1) runs on the CPU only, got device ",
                 device, ": use bfloat16 or float32 there");
  }
  const DType kv = dtype_from_string(kv_cache_dtype);
  LSERVE_CHECK(kv == DType::kF32 || kv == DType::kBF16, "kv_cache_dtype must be float32 or bfloat16, got ",
               kv_cache_dtype);
}

Engine::Engine(const ModelConfig& model_config, const EngineConfig& config) : config_(config) {
  config_.validate();
  ModelConfig checked = model_config;
  checked.validate();
  if (config_.max_model_len == 0) config_.max_model_len = checked.max_position_embeddings;
  config_.sparsity.validate(checked.num_layers, checked.num_kv_heads);
  if (config_.sparsity.enabled) config_.page_size = config_.sparsity.physical_page_size;
  backend_ = make_backend(config_.device, config_.num_threads);
  // TODO(#17): sparse attention on CUDA runs its attention on the reference kernel and is not yet
  // verified end to end on a device; LSERVE_EXPERIMENTAL_CUDA_SPARSITY=1 lets the device suite run it.
  const char* experimental = std::getenv("LSERVE_EXPERIMENTAL_CUDA_SPARSITY");
  const bool allow_device_sparsity = experimental != nullptr && std::string(experimental) == "1";
  LSERVE_CHECK(!config_.sparsity.enabled || backend_->device().type == DeviceType::kCPU || allow_device_sparsity,
               "sparse attention runs on the CPU backend only for now: the ", backend_->name(),
               " backend's sparse kernels are not verified yet (use sparsity='dense' on ", config_.device, ")");
  check_fits_memory(checked, config_, *backend_);
  const DType weight_dtype = config_.native_weights() ? DType::kF32 : dtype_from_string(config_.dtype);
  model_ = std::make_unique<LlamaModel>(checked, *backend_, weight_dtype, config_.max_model_len,
                                        config_.native_weights());
  model_->set_sparsity(config_.sparsity);
  eos_token_ids_ = config_.eos_token_ids;
  if (eos_token_ids_.empty() && checked.eos_token_id >= 0) eos_token_ids_.push_back(checked.eos_token_id);
  seed_rng_.seed(static_cast<uint64_t>(config_.seed));
}

bool Engine::load_weight(const std::string& name, const TensorView& tensor,
                         const std::shared_ptr<const void>& mapping) {
  std::lock_guard<std::mutex> lock(mutex_);
  LSERVE_CHECK(!ready_, "load_weight('", name, "') after finalize()");
  return model_->load_weight(name, tensor, mapping);
}

void Engine::finalize() {
  std::lock_guard<std::mutex> lock(mutex_);
  LSERVE_CHECK(!ready_, "finalize() called twice");
  model_->finalize();
  const DType kv_dtype = dtype_from_string(config_.kv_cache_dtype);
  const int64_t page_bytes = std::max<int64_t>(1, model_->kv_bytes_per_token(kv_dtype) * config_.page_size);
  const int64_t pages_per_seq = (static_cast<int64_t>(config_.max_model_len) + config_.page_size - 1) / config_.page_size;
  // The KV budget: kv_cache_memory if given; on a device, what gpu_memory_utilization leaves after
  // everything in use now; on the CPU 1 GiB.
  const char* remedy = "raise kv_cache_memory or lower max_model_len";
  int64_t budget = config_.kv_cache_memory;
  if (budget == 0) {
    const auto [free_bytes, total_bytes] = backend_->memory_info();
    if (total_bytes > 0) {
      const int64_t in_use = total_bytes - free_bytes;
      const int64_t step_bytes = model_->activation_bytes(config_.max_num_batched_tokens, config_.max_num_seqs);
      const int64_t headroom = 256LL << 20;  // allocator rounding, library workspaces, fragmentation
      budget = static_cast<int64_t>(config_.gpu_memory_utilization * static_cast<double>(total_bytes)) - in_use -
               2 * step_bytes - headroom;
      budget = std::max<int64_t>(budget, 0);
      remedy = "raise gpu_memory_utilization, lower max_model_len or max_num_batched_tokens";
    } else {
      budget = kCpuDefaultKvBytes;
    }
  }
  if (config_.sparsity.enabled) {
    // The page selector takes the streaming heads' memory (prefill rings, decode slots) first.
    selector_ = std::make_unique<PageSelector>(config_.sparsity, config_.page_size, config_.max_num_seqs,
                                               config_.max_num_batched_tokens, config_.max_model_len);
    budget -= selector_->size_memory(budget, model_->streaming_bytes_per_token(kv_dtype),
                                     model_->kv_bytes_per_token(kv_dtype));
    budget = std::max<int64_t>(budget, 0);
    if (config_.enable_prefix_caching) {
      // Prefix caching keeps the streaming heads' K/V of cached pages in shadow pages: 1/32 of what
      // is left. A hit needs shadows for its sinks and for the window before its end (the whole
      // prefix when it is shorter than the window), so a small tier still serves short prefixes,
      // and a prefix longer than the window needs the window's pages, not all of them.
      const int64_t shadow_page_bytes =
          std::max<int64_t>(1, model_->streaming_bytes_per_token(kv_dtype) * config_.page_size);
      int64_t shadows = std::min<int64_t>(budget / 32 / shadow_page_bytes, 1 << 24);
      if (shadows < selector_->num_sink_pages() + 1) shadows = 0;
      selector_->set_shadow_pages(static_cast<int>(shadows));
      budget = std::max<int64_t>(budget - shadows * shadow_page_bytes, 0);
    }
  }
  int64_t num_pages = config_.num_kv_pages;
  if (num_pages == 0) {
    num_pages = budget / page_bytes;
    if (config_.kv_cache_memory == 0) {  // default: no more than every sequence at full length needs
      num_pages = std::min<int64_t>(num_pages, pages_per_seq * config_.max_num_seqs);
    }
  }
  LSERVE_CHECK(num_pages >= pages_per_seq, "the KV cache holds ", num_pages * config_.page_size,
               " tokens (", num_pages, " pages of ", config_.page_size, "), fewer than max_model_len = ",
               config_.max_model_len, ": ", remedy);
  LSERVE_CHECK(num_pages <= (1LL << 30), "too many KV pages: ", num_pages);
  model_->allocate_kv_cache(static_cast<int>(num_pages), config_.page_size, kv_dtype);
  // Prefix pages are named under a salt that stands for everything else their K/V depend on: a page
  // is only ever found by an engine that would have computed the same values.
  const ModelConfig& mc = model_->config();
  std::ostringstream salt_text;
  salt_text << mc.architecture << '|' << mc.vocab_size << '|' << mc.hidden_size << '|' << mc.num_layers << '|'
            << mc.num_qo_heads << '|' << mc.num_kv_heads << '|' << mc.head_dim << '|' << mc.rope_theta << '|'
            << mc.rms_norm_eps << '|' << config_.dtype << '|' << config_.kv_cache_dtype << '|' << config_.page_size
            << '|' << config_.sparsity.enabled;
  const bool prefix_caching = config_.enable_prefix_caching;
  kv_cache_ = std::make_unique<KvCacheManager>(static_cast<int>(num_pages), config_.page_size, prefix_caching,
                                               std::hash<std::string>{}(salt_text.str()));
  dense_page_bytes_ = page_bytes;
  if (selector_) {
    model_->allocate_streaming_cache(selector_->num_stream_pages(), config_.page_size, kv_dtype);
    selector_->allocate_store(*backend_, model_->num_dense_kv_heads());
    model_->set_page_selector(selector_.get());
  }
  // Step capacities: every sequence's page list (shared prefix pages appear once per sharer, so the
  // pool's size is no bound), plus a padding page per row of a graph replay.
  const int64_t max_step_pages = (pages_per_seq + 1) * config_.max_num_seqs;
  // Tokens: a step's budget, or a decode graph's largest bucket (max_num_seqs rows), whichever is more.
  model_->prepare_steps(std::max(config_.max_num_batched_tokens, config_.max_num_seqs), config_.max_num_seqs,
                        max_step_pages);
  batch_.token_ids.reserve(config_.max_num_batched_tokens);
  batch_.positions.reserve(config_.max_num_batched_tokens);
  batch_.slot_mapping.reserve(config_.max_num_batched_tokens);
  batch_.qo_indptr.reserve(config_.max_num_seqs + 1);
  batch_.kv_page_indptr.reserve(config_.max_num_seqs + 1);
  batch_.kv_page_indices.reserve(static_cast<size_t>(max_step_pages));
  batch_.kv_lens.reserve(config_.max_num_seqs);
  batch_.logits_rows.reserve(config_.max_num_seqs);
  batch_.sparse.reserve(config_.max_num_batched_tokens, config_.max_num_seqs);
  if (!config_.enforce_eager && backend_->supports_graphs() && !model_->config().attention_bias) {
    model_->capture_decode_graphs(config_.max_num_seqs, config_.max_model_len);
  }
  scheduler_ = std::make_unique<Scheduler>(
      SchedulerConfig{config_.max_num_seqs, config_.max_num_batched_tokens, config_.max_model_len}, *kv_cache_,
      selector_.get());
  ready_ = true;
}

void Engine::check_new_request(int64_t request_id, const std::vector<int32_t>& prompt_token_ids,
                               const SamplingParams& params) const {
  LSERVE_CHECK(ready_, "add_request before finalize(): the model is not loaded");
  params.validate_for_model(model_->config().vocab_size, eos_token_ids_);
  LSERVE_CHECK(!prompt_token_ids.empty(), "request ", request_id, ": the prompt is empty");
  LSERVE_CHECK(static_cast<int64_t>(prompt_token_ids.size()) < config_.max_model_len, "request ", request_id,
               ": the prompt has ", prompt_token_ids.size(), " tokens, but max_model_len is ",
               config_.max_model_len, " (the prompt plus at least one generated token must fit)");
  const int vocab_size = model_->config().vocab_size;
  for (size_t i = 0; i < prompt_token_ids.size(); ++i) {
    LSERVE_CHECK(prompt_token_ids[i] >= 0 && prompt_token_ids[i] < vocab_size, "request ", request_id,
                 ": prompt token ", i, " has id ", prompt_token_ids[i], ", outside the vocabulary [0, ",
                 vocab_size, ")");
  }
  for (const auto& pending : pending_aborts_) {
    LSERVE_CHECK(pending.request_id != request_id, "request id ", request_id, " is already in use");
  }
  LSERVE_CHECK(!scheduler_->contains(request_id), "request id ", request_id, " is already in use");
  for (const auto& [leader_id, group] : followers_) {
    for (const auto& follower : group) {
      LSERVE_CHECK(follower->request_id != request_id, "request id ", request_id, " is already in use");
    }
  }
}

std::unique_ptr<Request> Engine::make_request(int64_t request_id, const std::vector<int32_t>& prompt_token_ids,
                                              const SamplingParams& params) {
  auto request = std::make_unique<Request>();
  request->request_id = request_id;
  request->prompt_token_ids = prompt_token_ids;
  request->params = params;
  request->sample_seed = params.seed ? static_cast<uint64_t>(*params.seed) : seed_rng_();
  return request;
}

void Engine::add_request(int64_t request_id, const std::vector<int32_t>& prompt_token_ids,
                         const SamplingParams& params) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_new_request(request_id, prompt_token_ids, params);
  scheduler_->add_request(make_request(request_id, prompt_token_ids, params));
}

void Engine::add_request_group(const std::vector<int64_t>& request_ids, const std::vector<int32_t>& prompt_token_ids,
                               const std::vector<SamplingParams>& params) {
  std::lock_guard<std::mutex> lock(mutex_);
  LSERVE_CHECK(!request_ids.empty(), "add_request_group: no request ids");
  LSERVE_CHECK(params.size() == request_ids.size(), "add_request_group: ", request_ids.size(), " request ids but ",
               params.size(), " SamplingParams (one each)");
  for (size_t i = 0; i < request_ids.size(); ++i) {
    check_new_request(request_ids[i], prompt_token_ids, params[i]);
    for (size_t j = 0; j < i; ++j) {
      LSERVE_CHECK(request_ids[j] != request_ids[i], "request id ", request_ids[i], " appears twice in the group");
    }
  }
  std::vector<std::unique_ptr<Request>> group;
  for (size_t i = 1; i < request_ids.size(); ++i) group.push_back(make_request(request_ids[i], prompt_token_ids, params[i]));
  scheduler_->add_request(make_request(request_ids[0], prompt_token_ids, params[0]));
  if (!group.empty()) followers_[request_ids[0]] = std::move(group);
}

void Engine::release_followers(int64_t leader_id) {
  const auto it = followers_.find(leader_id);
  if (it == followers_.end()) return;
  for (auto& follower : it->second) scheduler_->add_request(std::move(follower));
  followers_.erase(it);
}

void Engine::reset_prefix_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (ready_) kv_cache_->reset_prefix_cache();
}

void Engine::set_decode_sparsity(const SparsityConfig& sparsity) {
  std::lock_guard<std::mutex> lock(mutex_);
  LSERVE_CHECK(ready_, "set_decode_sparsity() before finalize()");
  LSERVE_CHECK(selector_ != nullptr, "set_decode_sparsity() on a dense engine (sparsity off)");
  const char* differs = config_.sparsity.layout_difference(sparsity);
  LSERVE_CHECK(differs == nullptr, "set_decode_sparsity: SparsityConfig.", differs ? differs : "",
               " differs from the engine's; only the decode-time selection settings may change (decode_token_budget, "
               "head_token_budgets, select_recent_tokens, selection_reuse_interval, always_select_sink_page, "
               "page_score, page_score_spread, group_score)");
  LSERVE_CHECK(backend_->device().type == DeviceType::kCPU,
               "set_decode_sparsity() runs on the CPU backend only (the CUDA backend's decode graphs capture the "
               "selection settings)");
  LSERVE_CHECK(!scheduler_->has_unfinished() && pending_aborts_.empty() && followers_.empty(),
               "set_decode_sparsity() with requests in flight: wait until they finish");
  sparsity.validate(model_->config().num_layers, model_->config().num_kv_heads);
  selector_->set_decode_settings(sparsity, *backend_, model_->num_dense_kv_heads());
  model_->set_decode_sparsity(sparsity);
  config_.sparsity = sparsity;
}

bool Engine::abort_request(int64_t request_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!ready_) return false;
  std::unique_ptr<Request> request = scheduler_->abort_request(request_id);
  if (request) {
    release_followers(request_id);  // the others of its group prefill on their own
  } else {
    for (auto it = followers_.begin(); it != followers_.end() && !request; ++it) {
      auto& group = it->second;
      for (auto f = group.begin(); f != group.end(); ++f) {
        if ((*f)->request_id != request_id) continue;
        request = std::move(*f);
        group.erase(f);
        break;
      }
      if (request && group.empty()) followers_.erase(it);
      if (request) break;
    }
  }
  if (!request) return false;
  RequestOutput output;
  output.request_id = request_id;
  output.finished = true;
  output.finish_reason = finish_reason_name(FinishReason::kAbort);
  output.num_prompt_tokens = static_cast<int64_t>(request->prompt_token_ids.size());
  output.num_output_tokens = static_cast<int64_t>(request->output_token_ids.size());
  pending_aborts_.push_back(std::move(output));
  return true;
}

bool Engine::has_unfinished_requests() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ready_ && (scheduler_->has_unfinished() || !pending_aborts_.empty() || !followers_.empty());
}

bool Engine::is_eos(int32_t token_id) const {
  return std::find(eos_token_ids_.begin(), eos_token_ids_.end(), token_id) != eos_token_ids_.end();
}

std::vector<RequestOutput> Engine::step() {
  std::lock_guard<std::mutex> lock(mutex_);
  LSERVE_CHECK(ready_, "step() before finalize()");
  std::vector<RequestOutput> outputs = std::move(pending_aborts_);
  pending_aborts_.clear();
  SchedulerOutput scheduled = scheduler_->schedule();
  num_preemptions_ += static_cast<int64_t>(scheduled.preempted_request_ids.size());
  prefix_cache_queries_ += scheduled.prefix_cache_queries;
  prefix_cache_hits_ += scheduled.prefix_cache_hits;
  if (scheduled.chunks.empty()) return outputs;

  // Prefix hits with sparse attention: the streaming heads' sinks and windows come back from the
  // page selector's shadow pages (backend page copies, before the forward pass).
  for (const auto& [request_id, num_tokens] : scheduled.restores) {
    for (const auto& [shadow, page] :
         selector_->restore_copies(request_id, kv_cache_->chain(request_id), num_tokens / kv_cache_->page_size())) {
      model_->copy_streaming_pages(shadow, page, 1);
    }
  }

  // Batch metadata: each chunk is one sequence in the attention call; the page selector plans the
  // sparse part (once per step, on the host).
  ForwardBatch& batch = batch_;
  batch.clear();
  const int page_size = kv_cache_->page_size();
  batch.qo_indptr.push_back(0);
  batch.kv_page_indptr.push_back(0);
  for (const ScheduledChunk& chunk : scheduled.chunks) {
    const Request& request = *chunk.request;
    const int64_t prompt_end = static_cast<int64_t>(request.prompt_token_ids.size());
    num_prompt_tokens_computed_ +=
        std::max<int64_t>(0, std::min(prompt_end, chunk.start_position + chunk.num_new_tokens) - chunk.start_position);
    for (int64_t position = chunk.start_position; position < chunk.start_position + chunk.num_new_tokens;
         ++position) {
      batch.token_ids.push_back(request.token_at(position));
      batch.positions.push_back(static_cast<int32_t>(position));
      batch.slot_mapping.push_back(kv_cache_->slot(request.request_id, position));
    }
    const int64_t kv_len = chunk.start_position + chunk.num_new_tokens;
    const int64_t num_pages = (kv_len + page_size - 1) / page_size;
    const std::vector<int32_t>& pages = kv_cache_->pages(request.request_id);
    batch.kv_page_indices.insert(batch.kv_page_indices.end(), pages.begin(), pages.begin() + num_pages);
    batch.qo_indptr.push_back(static_cast<int32_t>(batch.token_ids.size()));
    batch.kv_page_indptr.push_back(static_cast<int32_t>(batch.kv_page_indices.size()));
    batch.kv_lens.push_back(static_cast<int32_t>(kv_len));
    if (chunk.samples) batch.logits_rows.push_back(static_cast<int32_t>(batch.token_ids.size() - 1));
    if (selector_) {
      selector_->plan_chunk(request.request_id, chunk.start_position, chunk.num_new_tokens, num_pages, chunk.samples,
                            &batch.sparse);
    }
  }

  // One path on every backend: logits stay on the backend, the sample op draws there (the logprobs
  // op too, when asked), and only token ids and logprobs come back. capture_logits copies the rows.
  const TensorView logits = model_->forward_logits(batch);
  std::vector<float> captured_logits;
  if (config_.capture_logits && logits.defined()) {
    captured_logits.resize(static_cast<size_t>(logits.numel()));
    backend_->copy(TensorView(captured_logits.data(), DType::kF32, {logits.size(0), logits.size(1)}), logits);
    backend_->synchronize();
  }
  named_pages_.clear();
  scheduler_->commit(scheduled, selector_ ? &named_pages_ : nullptr);
  if (selector_) {
    // Pages just named in the prefix cache keep their streaming heads' K/V in shadows (copied from
    // the rings, which still hold them), before commit hands prefill rings back.
    for (const NamedPage& named : named_pages_) {
      const auto [page, shadow] =
          selector_->shadow_page_for(named.seq_id, named.logical_page, named.name, kv_cache_->chain(named.seq_id));
      if (page >= 0) model_->copy_streaming_pages(page, shadow, 1);
    }
    selector_->commit();
  }
  ++num_steps_;

  // Sampling rows: each sampling chunk's request, then the samples of its group that fork from it
  // now (they draw their first token from its logits with their own seeds, so a follower's tokens
  // are those it would draw alone); one that cannot fork now prefills later on its own.
  std::vector<SampleRow> rows;
  int32_t logits_row = 0;
  for (const ScheduledChunk& chunk : scheduled.chunks) {
    if (!chunk.samples) continue;
    Request& request = *chunk.request;
    rows.push_back({&request, logits_row});
    const auto group = followers_.find(request.request_id);
    if (group != followers_.end()) {
      std::vector<std::unique_ptr<Request>> waiting = std::move(group->second);
      followers_.erase(group);
      for (auto& follower : waiting) {
        Request* forked = follower.get();
        if (!fork_sample(request, follower)) {
          scheduler_->add_request(std::move(follower));
          continue;
        }
        rows.push_back({forked, logits_row});
      }
    }
    ++logits_row;
  }
  if (rows.empty()) return outputs;
  const SampledRows sampled = sample_rows(rows, logits);

  const int vocab_size = model_->config().vocab_size;
  for (size_t r = 0; r < rows.size(); ++r) {
    Request& request = *rows[r].request;
    RequestOutput output;
    output.request_id = request.request_id;
    if (config_.capture_logits) {
      const auto begin = captured_logits.begin() + static_cast<int64_t>(rows[r].logits_row) * vocab_size;
      output.logits.assign(begin, begin + vocab_size);
    }
    const int32_t token_id = sampled.token_ids[r];
    if (token_id < 0 || token_id >= vocab_size) {
      // A row that cannot be sampled (NaN logits, everything masked) aborts its own request only:
      // the others in the batch keep their tokens and the engine stays consistent.
      output.finished = true;
      output.finish_reason = finish_reason_name(FinishReason::kAbort);
      output.error = "request " + std::to_string(request.request_id) +
                     ": the sampler found its logits row invalid (NaN logits, or every token masked)";
      output.num_prompt_tokens = static_cast<int64_t>(request.prompt_token_ids.size());
      output.num_output_tokens = static_cast<int64_t>(request.output_token_ids.size());
      output.num_cached_tokens = std::max<int64_t>(0, request.num_cached_tokens);
      const int64_t request_id = request.request_id;
      scheduler_->finish_request(request_id, FinishReason::kAbort);  // `request` dies here
      release_followers(request_id);
      outputs.push_back(std::move(output));
      continue;
    }
    SampledToken token;
    token.token_id = token_id;
    if (request.params.logprobs) {
      token.logprob = sampled.logprobs[r];
      const size_t top_begin = r * static_cast<size_t>(sampled.num_top);
      for (int j = 0; j < *request.params.logprobs; ++j) {
        token.top_logprobs.emplace_back(sampled.top_token_ids[top_begin + j], sampled.top_logprobs[top_begin + j]);
      }
    }
    accept_token(request, std::move(token), output);  // may finish the request: `request` dies there
    outputs.push_back(std::move(output));
  }
  return outputs;
}

void Engine::accept_token(Request& request, SampledToken sampled, RequestOutput& output) {
  request.output_token_ids.push_back(sampled.token_id);
  output.new_token_ids.push_back(sampled.token_id);
  if (request.params.logprobs) {
    output.new_logprobs.push_back({sampled.logprob, std::move(sampled.top_logprobs)});
  }
  FinishReason reason = FinishReason::kNone;
  const int64_t num_outputs = static_cast<int64_t>(request.output_token_ids.size());
  const auto& stop_ids = request.params.stop_token_ids;
  const bool min_reached = num_outputs >= request.params.min_tokens;
  if (min_reached && std::find(stop_ids.begin(), stop_ids.end(), sampled.token_id) != stop_ids.end()) {
    reason = FinishReason::kStop;
  } else if (min_reached && !request.params.ignore_eos && is_eos(sampled.token_id)) {
    reason = FinishReason::kStop;
  } else if (num_outputs >= request.params.max_tokens || request.num_tokens() >= config_.max_model_len) {
    reason = FinishReason::kLength;
  }
  output.num_prompt_tokens = static_cast<int64_t>(request.prompt_token_ids.size());
  output.num_output_tokens = num_outputs;
  output.num_cached_tokens = std::max<int64_t>(0, request.num_cached_tokens);
  if (reason != FinishReason::kNone) {
    output.finished = true;
    output.finish_reason = finish_reason_name(reason);
    scheduler_->finish_request(request.request_id, reason);  // frees the pages; `request` dies here
  }
}

bool Engine::fork_sample(const Request& leader, std::unique_ptr<Request>& follower) {
  if (scheduler_->num_running() >= config_.max_num_seqs) return false;
  const int64_t num_tokens = static_cast<int64_t>(leader.prompt_token_ids.size());
  const int page_size = kv_cache_->page_size();
  const int64_t id = follower->request_id;
  // Full pages are shared; a partial last page is the follower's own copy (copy on write).
  kv_cache_->fork(leader.request_id, id, num_tokens);
  if (num_tokens % page_size != 0) {
    if (!kv_cache_->reserve(id, num_tokens)) {
      kv_cache_->release(id);
      return false;
    }
    const int64_t last = num_tokens / page_size;
    model_->copy_kv_page(kv_cache_->pages(leader.request_id)[static_cast<size_t>(last)],
                         kv_cache_->pages(id)[static_cast<size_t>(last)]);
  }
  if (selector_) {  // the streaming heads' sinks and decode ring, and the decode state
    if (!selector_->fork(leader.request_id, id)) {
      kv_cache_->release(id);
      return false;
    }
    model_->copy_streaming_pages(selector_->slot_of(leader.request_id) * selector_->slot_pages(),
                                 selector_->slot_of(id) * selector_->slot_pages(), selector_->slot_pages());
  }
  follower->num_computed_tokens = num_tokens;
  follower->num_cached_tokens = num_tokens;
  const bool added = scheduler_->add_running(std::move(follower));
  LSERVE_CHECK(added, "fork_sample: the scheduler refused request ", id, " after the running check");
  ++num_forked_;
  return true;
}

Engine::SampledRows Engine::sample_rows(const std::vector<SampleRow>& rows, const TensorView& logits) {
  std::vector<float> temperature, top_p, min_p, repetition, presence, frequency;
  std::vector<int32_t> top_k, history_indptr = {0}, history, num_prompt, banned_indptr = {0}, banned, row_map;
  std::vector<int64_t> seeds, offsets;
  bool any_penalty = false;
  int num_top = -1;  // the most top logprobs a row asks for; -1: no row wants logprobs
  for (const SampleRow& row : rows) {
    const Request& request = *row.request;
    const SamplingParams& p = request.params;
    row_map.push_back(row.logits_row);
    num_top = std::max(num_top, p.logprobs.value_or(-1));
    temperature.push_back(p.temperature);
    top_k.push_back(p.top_k);
    top_p.push_back(p.top_p);
    min_p.push_back(p.min_p);
    // The Philox key and counter: (the request's seed, its tokens so far). Neither depends on the
    // batch, on preemption or on forking, so a seeded request draws the same numbers everywhere.
    seeds.push_back(static_cast<int64_t>(request.sample_seed));
    offsets.push_back(static_cast<int64_t>(request.output_token_ids.size()));
    const bool penalised = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f;
    if (penalised) {
      any_penalty = true;
      history.insert(history.end(), request.prompt_token_ids.begin(), request.prompt_token_ids.end());
      history.insert(history.end(), request.output_token_ids.begin(), request.output_token_ids.end());
    }
    num_prompt.push_back(penalised ? static_cast<int32_t>(request.prompt_token_ids.size()) : 0);
    history_indptr.push_back(static_cast<int32_t>(history.size()));
    repetition.push_back(p.repetition_penalty);
    presence.push_back(p.presence_penalty);
    frequency.push_back(p.frequency_penalty);
    if (static_cast<int64_t>(request.output_token_ids.size()) < p.min_tokens) {  // min_tokens masking
      banned.insert(banned.end(), p.stop_token_ids.begin(), p.stop_token_ids.end());
      if (!p.ignore_eos) banned.insert(banned.end(), eos_token_ids_.begin(), eos_token_ids_.end());
    }
    banned_indptr.push_back(static_cast<int32_t>(banned.size()));
  }
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const int64_t vocab_size = logits.size(1);
  const bool want_logprobs = num_top >= 0;
  // The sampler overwrites its logits: it gets its own copy when the raw rows are still needed
  // (logprobs) or when rows share one (forked samples).
  const bool gather = want_logprobs || num_rows != logits.size(0);
  // Parameters: one host -> device copy.
  PackedUpload pack;
  const int i_temperature = pack.add(temperature, DType::kF32), i_top_k = pack.add(top_k, DType::kI32);
  const int i_top_p = pack.add(top_p, DType::kF32), i_min_p = pack.add(min_p, DType::kF32);
  const int i_seed = pack.add(seeds, DType::kI64), i_offset = pack.add(offsets, DType::kI64);
  const int i_row_map = pack.add(row_map, DType::kI32);
  int i_history_indptr = -1, i_history = -1, i_num_prompt = -1, i_repetition = -1, i_presence = -1,
      i_frequency = -1, i_banned_indptr = -1, i_banned = -1;
  if (any_penalty) {
    i_history_indptr = pack.add(history_indptr, DType::kI32);
    i_history = pack.add(history, DType::kI32);
    i_num_prompt = pack.add(num_prompt, DType::kI32);
    i_repetition = pack.add(repetition, DType::kF32);
    i_presence = pack.add(presence, DType::kF32);
    i_frequency = pack.add(frequency, DType::kF32);
  }
  if (!banned.empty()) {
    i_banned_indptr = pack.add(banned_indptr, DType::kI32);
    i_banned = pack.add(banned, DType::kI32);
  }
  const Tensor block = pack.upload(*backend_);
  Tensor sample_logits;
  SampleArgs args;
  args.logits = logits;
  if (gather) {
    sample_logits = backend_->empty({num_rows, vocab_size}, DType::kF32);
    backend_->gather_rows({logits, pack.view(i_row_map, block), sample_logits.view()});
    args.logits = sample_logits.view();
  }
  args.temperature = pack.view(i_temperature, block);
  args.top_k = pack.view(i_top_k, block);
  args.top_p = pack.view(i_top_p, block);
  args.min_p = pack.view(i_min_p, block);
  args.seed = pack.view(i_seed, block);
  args.offset = pack.view(i_offset, block);
  args.raise_invalid_rows = false;  // a bad row aborts its own request (step() reads the -1)
  Tensor output = backend_->empty({num_rows}, DType::kI32);
  args.output = output.view();
  Tensor workspace;
  if (any_penalty) {
    args.history_indptr = pack.view(i_history_indptr, block);
    args.history_token_ids = pack.view(i_history, block);
    args.num_prompt_tokens = pack.view(i_num_prompt, block);
    args.repetition_penalty = pack.view(i_repetition, block);
    args.presence_penalty = pack.view(i_presence, block);
    args.frequency_penalty = pack.view(i_frequency, block);
    workspace = backend_->empty({sample_workspace_bytes(num_rows, vocab_size)}, DType::kU8);
    args.workspace = workspace.view();
  }
  if (!banned.empty()) {
    args.banned_indptr = pack.view(i_banned_indptr, block);
    args.banned_token_ids = pack.view(i_banned, block);
  }
  backend_->sample(args);

  SampledRows result;
  result.token_ids.resize(static_cast<size_t>(num_rows));
  Tensor logprobs, top_token_ids, top_logprobs;
  if (want_logprobs) {
    result.num_top = num_top;
    logprobs = backend_->empty({num_rows}, DType::kF32);
    top_token_ids = backend_->empty({num_rows, num_top}, DType::kI32);
    top_logprobs = backend_->empty({num_rows, num_top}, DType::kF32);
    backend_->logprobs({logits, pack.view(i_row_map, block), output.view(), logprobs.view(), top_token_ids.view(),
                        top_logprobs.view()});
    result.logprobs.resize(static_cast<size_t>(num_rows));
    result.top_token_ids.resize(static_cast<size_t>(num_rows * num_top));
    result.top_logprobs.resize(static_cast<size_t>(num_rows * num_top));
    backend_->copy(TensorView(result.logprobs.data(), DType::kF32, {num_rows}), logprobs);
    if (num_top > 0) {
      backend_->copy(TensorView(result.top_token_ids.data(), DType::kI32, {num_rows, num_top}), top_token_ids);
      backend_->copy(TensorView(result.top_logprobs.data(), DType::kF32, {num_rows, num_top}), top_logprobs);
    }
  }
  backend_->copy(TensorView(result.token_ids.data(), DType::kI32, {num_rows}), output);
  backend_->synchronize();
  return result;
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  EngineStats stats;
  if (!ready_) return stats;
  stats.num_running = scheduler_->num_running();
  stats.num_waiting = scheduler_->num_waiting();
  for (const auto& [leader_id, group] : followers_) stats.num_waiting += static_cast<int>(group.size());
  stats.prefix_caching = kv_cache_->prefix_caching();
  stats.num_cached_pages = kv_cache_->pool().num_cached();
  stats.prefix_cache_queries = prefix_cache_queries_;
  stats.prefix_cache_hits = prefix_cache_hits_;
  stats.num_prompt_tokens_computed = num_prompt_tokens_computed_;
  stats.num_forked_samples = num_forked_;
  stats.weight_bytes_mapped = model_->weight_bytes_mapped();
  stats.weight_bytes_packed = model_->weight_bytes_packed();
  stats.num_total_pages = kv_cache_->num_total_pages();
  stats.num_free_pages = kv_cache_->num_free_pages();
  stats.page_size = kv_cache_->page_size();
  stats.num_preemptions = num_preemptions_;
  stats.num_steps = num_steps_;
  stats.kv_cache_bytes = stats.num_total_pages * dense_page_bytes_;
  stats.kv_cache_bytes_in_use = (stats.num_total_pages - stats.num_free_pages) * dense_page_bytes_;
  if (selector_) {
    const PageSelector& sel = *selector_;
    stats.num_stream_slots = sel.num_slots();
    stats.num_free_stream_slots = sel.num_free_slots();
    stats.num_prefill_rings = sel.num_prefill_rings();
    stats.num_free_prefill_rings = sel.num_free_prefill_rings();
    stats.streaming_bytes_per_seq = sel.slot_bytes();
    stats.num_shadow_pages = sel.num_shadow_pages();
    stats.streaming_kv_bytes = sel.num_slots() * sel.slot_bytes() + sel.num_prefill_rings() * sel.prefill_ring_bytes() +
                               static_cast<int64_t>(sel.num_shadow_pages()) * sel.page_size() *
                                   model_->streaming_bytes_per_token(dtype_from_string(config_.kv_cache_dtype));
    stats.streaming_kv_bytes_in_use = (sel.num_slots() - sel.num_free_slots()) * sel.slot_bytes() +
                                      (sel.num_prefill_rings() - sel.num_free_prefill_rings()) * sel.prefill_ring_bytes();
    stats.kv_cache_bytes += stats.streaming_kv_bytes;
    stats.kv_cache_bytes_in_use += stats.streaming_kv_bytes_in_use;
  }
  stats.isolation_violations = backend_->isolation_violations();
  stats.last_step_pages_selected = model_->last_pages_selected();
  stats.last_step_pages_total = model_->last_pages_total();
  stats.graph_batch_sizes = model_->decode_graph_batch_sizes();
  stats.num_graph_replays = model_->num_graph_replays();
  return stats;
}

std::vector<std::vector<int32_t>> Engine::generate(const std::vector<std::vector<int32_t>>& prompts,
                                                   const SamplingParams& params) {
  // Ids far above what callers use for their own requests.
  const int64_t base_id = (1LL << 62) + num_steps_ * 1000003LL;
  std::vector<std::vector<int32_t>> results(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) add_request(base_id + static_cast<int64_t>(i), prompts[i], params);
  size_t num_finished = 0;
  while (num_finished < prompts.size()) {
    for (const RequestOutput& output : step()) {
      const int64_t index = output.request_id - base_id;
      if (index < 0 || index >= static_cast<int64_t>(prompts.size())) continue;
      auto& tokens = results[static_cast<size_t>(index)];
      tokens.insert(tokens.end(), output.new_token_ids.begin(), output.new_token_ids.end());
      if (output.finished) ++num_finished;
    }
    LSERVE_CHECK(num_finished == prompts.size() || has_unfinished_requests(),
                 "generate: requests vanished without finishing");
  }
  return results;
}

}  // namespace lserve
