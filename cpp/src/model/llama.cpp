// LlamaModel: weight layout, strict loading and the forward pass over Backend ops.
#include "lserve/model/llama.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "lserve/model/rope.h"
#include "lserve/packed_upload.h"

namespace lserve {

namespace {

struct LengthHints {
  int32_t max_q_len = 0, max_kv_len = 0;
};

LengthHints length_hints(const ForwardBatch& batch) {
  LengthHints hints;
  for (size_t s = 0; s + 1 < batch.qo_indptr.size(); ++s) {
    hints.max_q_len = std::max(hints.max_q_len, batch.qo_indptr[s + 1] - batch.qo_indptr[s]);
  }
  for (int32_t kv_len : batch.kv_lens) hints.max_kv_len = std::max(hints.max_kv_len, kv_len);
  return hints;
}

AttentionArgs attention_args(const TensorView& query, const Tensor& k_cache, const Tensor& v_cache,
                             const TensorView& qo_indptr, const TensorView& page_indptr,
                             const TensorView& page_indices, const TensorView& kv_lens, const TensorView& output,
                             float sm_scale, const LengthHints& hints) {
  AttentionArgs args;
  args.max_q_len = hints.max_q_len;
  args.max_kv_len = hints.max_kv_len;
  args.query = query;
  args.k_cache = k_cache.view();
  args.v_cache = v_cache.view();
  args.qo_indptr = qo_indptr;
  args.kv_page_indptr = page_indptr;
  args.kv_page_indices = page_indices;
  args.kv_lens = kv_lens;
  args.output = output;
  args.sm_scale = sm_scale;
  return args;
}

std::string layer_prefix(int layer_idx) { return "model.layers." + std::to_string(layer_idx) + "."; }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + ")";
}

}  // namespace

LlamaModel::LlamaModel(const ModelConfig& config, Backend& backend, DType weight_dtype, int max_positions,
                       bool native_weights)
    : config_(config),
      backend_(backend),
      weight_dtype_(weight_dtype),
      activation_dtype_(backend.activation_dtype(weight_dtype)),
      native_weights_(native_weights) {
  config_.validate();
  LSERVE_CHECK(weight_dtype == DType::kF32 || weight_dtype == DType::kBF16 || weight_dtype == DType::kF16,
               "weight dtype must be float32, bfloat16 or float16, got ", dtype_name(weight_dtype));
  LSERVE_CHECK(!native_weights || backend.device().type == DeviceType::kCPU, "native (as stored) weights run on ",
               "the CPU backend only; the ", backend.name(), " backend takes float32, bfloat16 or float16 weights");
  LSERVE_CHECK(max_positions >= 1, "max_positions must be >= 1, got ", max_positions);
  const int64_t hidden = config_.hidden_size, inter = config_.intermediate_size, head_dim = config_.head_dim;
  const int64_t q_rows = config_.num_qo_heads * head_dim, kv_rows = config_.num_kv_heads * head_dim;

  // A weight matrix: allocated now in weight_dtype, or (native weights) at its first load_weight(),
  // in the dtype the file stores it in.
  auto matrix = [&](Tensor& tensor, std::initializer_list<int64_t> shape) {
    if (!native_weights_) tensor = backend_.empty(shape, weight_dtype);
  };
  matrix(embed_tokens_, {config_.vocab_size, hidden});
  final_norm_ = backend_.empty({hidden}, DType::kF32);
  if (config_.tie_word_embeddings) {
    lm_head_ = embed_tokens_;  // native weights: set again in finalize(), once the embedding exists
  } else {
    matrix(lm_head_, {config_.vocab_size, hidden});
  }
  layers_.resize(config_.num_layers);
  for (int layer_idx = 0; layer_idx < config_.num_layers; ++layer_idx) {
    Layer& layer = layers_[layer_idx];
    layer.num_dense_kv = config_.num_kv_heads;
    layer.kv_order.resize(config_.num_kv_heads);
    for (int h = 0; h < config_.num_kv_heads; ++h) layer.kv_order[h] = h;
    layer.input_norm = backend_.empty({hidden}, DType::kF32);
    layer.post_norm = backend_.empty({hidden}, DType::kF32);
    matrix(layer.qkv_weight, {q_rows + 2 * kv_rows, hidden});
    matrix(layer.o_weight, {hidden, q_rows});
    matrix(layer.gate_up_weight, {2 * inter, hidden});
    matrix(layer.down_weight, {hidden, inter});
    if (config_.attention_bias) layer.qkv_bias = backend_.empty({q_rows + 2 * kv_rows}, DType::kF32);
  }
  for (const WeightSpec& spec : weight_specs(config_)) {
    Tensor* target = nullptr;
    std::vector<int64_t> matrix_shape = spec.shape;  // the fused tensor's shape where parts share one
    WeightLayout* layout = nullptr;
    Layer* layer = spec.layer_idx >= 0 ? &layers_[spec.layer_idx] : nullptr;
    switch (spec.kind) {
      case WeightKind::kEmbed: target = &embed_tokens_; break;
      case WeightKind::kFinalNorm: target = &final_norm_; break;
      case WeightKind::kLmHead: target = &lm_head_, layout = &lm_head_layout_; break;
      case WeightKind::kInputNorm: target = &layer->input_norm; break;
      case WeightKind::kPostNorm: target = &layer->post_norm; break;
      case WeightKind::kQkv:
        target = &layer->qkv_weight, matrix_shape = {q_rows + 2 * kv_rows, hidden}, layout = &layer->qkv_layout;
        break;
      case WeightKind::kQkvBias: target = &layer->qkv_bias, matrix_shape = {q_rows + 2 * kv_rows}; break;
      case WeightKind::kO: target = &layer->o_weight, layout = &layer->o_layout; break;
      case WeightKind::kGateUp:
        target = &layer->gate_up_weight, matrix_shape = {2 * inter, hidden}, layout = &layer->gate_up_layout;
        break;
      case WeightKind::kDown: target = &layer->down_weight, layout = &layer->down_layout; break;
    }
    slots_[spec.name] = {target, spec.row_offset, spec.shape, matrix_shape, layout};
  }

  const std::vector<float> table = rope_cos_sin_cache(config_, max_positions);
  cos_sin_cache_ = backend_.empty({max_positions, config_.rotary_dim()}, DType::kF32);
  backend_.copy(cos_sin_cache_, TensorView(const_cast<float*>(table.data()), DType::kF32,
                                           {max_positions, config_.rotary_dim()}));
}

std::vector<LlamaModel::WeightSpec> LlamaModel::weight_specs(ModelConfig config) {
  config.validate();
  const int64_t hidden = config.hidden_size, inter = config.intermediate_size, vocab = config.vocab_size;
  const int64_t q_rows = static_cast<int64_t>(config.num_qo_heads) * config.head_dim;
  const int64_t kv_rows = static_cast<int64_t>(config.num_kv_heads) * config.head_dim;
  std::vector<WeightSpec> specs = {{"model.embed_tokens.weight", {vocab, hidden}, WeightKind::kEmbed}};
  for (int layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string prefix = layer_prefix(layer_idx);
    auto add = [&](const char* suffix, std::vector<int64_t> shape, WeightKind kind, int64_t row_offset) {
      specs.push_back({prefix + suffix, std::move(shape), kind, layer_idx, row_offset});
    };
    add("input_layernorm.weight", {hidden}, WeightKind::kInputNorm, 0);
    add("self_attn.q_proj.weight", {q_rows, hidden}, WeightKind::kQkv, 0);
    add("self_attn.k_proj.weight", {kv_rows, hidden}, WeightKind::kQkv, q_rows);
    add("self_attn.v_proj.weight", {kv_rows, hidden}, WeightKind::kQkv, q_rows + kv_rows);
    if (config.attention_bias) {
      add("self_attn.q_proj.bias", {q_rows}, WeightKind::kQkvBias, 0);
      add("self_attn.k_proj.bias", {kv_rows}, WeightKind::kQkvBias, q_rows);
      add("self_attn.v_proj.bias", {kv_rows}, WeightKind::kQkvBias, q_rows + kv_rows);
    }
    add("self_attn.o_proj.weight", {hidden, q_rows}, WeightKind::kO, 0);
    add("post_attention_layernorm.weight", {hidden}, WeightKind::kPostNorm, 0);
    add("mlp.gate_proj.weight", {inter, hidden}, WeightKind::kGateUp, 0);
    add("mlp.up_proj.weight", {inter, hidden}, WeightKind::kGateUp, inter);
    add("mlp.down_proj.weight", {hidden, inter}, WeightKind::kDown, 0);
  }
  specs.push_back({"model.norm.weight", {hidden}, WeightKind::kFinalNorm});
  if (!config.tie_word_embeddings) specs.push_back({"lm_head.weight", {vocab, hidden}, WeightKind::kLmHead});
  return specs;
}

namespace {

// Saturating int64 arithmetic for sizes derived from an untrusted config.
int64_t saturating_add(int64_t a, int64_t b) {
  int64_t sum;
  return __builtin_add_overflow(a, b, &sum) ? std::numeric_limits<int64_t>::max() : sum;
}

int64_t saturating_mul(int64_t a, int64_t b) {
  int64_t product;
  return __builtin_mul_overflow(a, b, &product) ? std::numeric_limits<int64_t>::max() : product;
}

}  // namespace

int64_t LlamaModel::weight_bytes(const ModelConfig& config, DType weight_dtype) {
  // The shapes of the constructor's backend_.empty calls.
  // Bytes per item, in 1/32 byte units so that block dtypes count exactly.
  const int64_t weight_size_32 = static_cast<int64_t>(dtype_nbytes(weight_dtype, 32));
  const int64_t hidden = config.hidden_size, inter = config.intermediate_size, head_dim = config.head_dim;
  const int64_t q_rows = saturating_mul(config.num_qo_heads, head_dim);
  const int64_t qkv_rows = saturating_add(q_rows, saturating_mul(2 * static_cast<int64_t>(config.num_kv_heads), head_dim));
  const int64_t embed = saturating_mul(saturating_mul(config.vocab_size, hidden), weight_size_32) / 32;
  int64_t total = saturating_add(embed, 4 * hidden);
  if (!config.tie_word_embeddings) total = saturating_add(total, embed);
  int64_t layer_elements = saturating_mul(qkv_rows, hidden);              // qkv
  layer_elements = saturating_add(layer_elements, saturating_mul(hidden, q_rows));   // o
  layer_elements = saturating_add(layer_elements, saturating_mul(3 * inter, hidden));  // gate, up, down
  int64_t layer = saturating_add(saturating_mul(layer_elements, weight_size_32) / 32, 2 * 4 * hidden);  // + norms
  if (config.attention_bias) layer = saturating_add(layer, saturating_mul(qkv_rows, 4));
  return saturating_add(total, saturating_mul(layer, config.num_layers));
}

int64_t LlamaModel::rope_table_bytes(const ModelConfig& config, int64_t max_positions) {
  return saturating_mul(saturating_mul(max_positions, config.rotary_dim()), 4);
}

void LlamaModel::set_sparsity(const SparsityConfig& sparsity) {
  LSERVE_CHECK(loaded_.empty(), "set_sparsity() after load_weight(): the head order is fixed at loading");
  sparsity.validate(config_.num_layers, config_.num_kv_heads);
  sparsity_ = sparsity;
  for (int layer_idx = 0; layer_idx < config_.num_layers; ++layer_idx) {
    Layer& layer = layers_[layer_idx];
    layer.kv_order.clear();
    for (int pass = 0; pass < 2; ++pass) {  // dense heads first, then streaming heads
      for (int h = 0; h < config_.num_kv_heads; ++h) {
        if (sparsity_.is_streaming(layer_idx, h, config_.num_kv_heads) == (pass == 1)) layer.kv_order.push_back(h);
      }
      if (pass == 0) layer.num_dense_kv = static_cast<int>(layer.kv_order.size());
    }
  }
}

void LlamaModel::set_decode_sparsity(const SparsityConfig& sparsity) {
  const char* differs = sparsity_.layout_difference(sparsity);
  LSERVE_CHECK(differs == nullptr, "set_decode_sparsity: SparsityConfig.", differs ? differs : "",
               " differs from the model's; only the decode-time selection settings may change");
  LSERVE_CHECK(!graphs_, "set_decode_sparsity with decode graphs captured: they hold the selection settings");
  sparsity.validate(config_.num_layers, config_.num_kv_heads);
  sparsity_ = sparsity;
}

std::vector<uint8_t> LlamaModel::permute_heads(int layer_idx, const std::string& kind, const TensorView& tensor) const {
  LSERVE_CHECK(tensor.device.type == DeviceType::kCPU && tensor.is_contiguous(), "weight of layer ", layer_idx,
               ": sparse head reordering needs a contiguous host tensor");
  const std::vector<int>& order = layers_[layer_idx].kv_order;
  const int64_t head_dim = config_.head_dim, group = config_.num_qo_heads / config_.num_kv_heads;
  // Sizes in bytes, so that block dtypes (whole blocks per head) move like the others.
  const uint8_t* src = static_cast<const uint8_t*>(tensor.data);
  std::vector<uint8_t> out(tensor.nbytes());
  LSERVE_CHECK(kind == "q_proj" || kind == "k_proj" || kind == "v_proj", "permute_heads: ", kind,
               " is not reordered");
  // q_proj: row blocks of group * head_dim rows; k_proj / v_proj: row blocks of head_dim rows.
  const int64_t row_bytes = static_cast<int64_t>(dtype_nbytes(tensor.dtype, tensor.ndim == 2 ? tensor.shape[1] : 1));
  const int64_t block = (kind == "q_proj" ? group : 1) * head_dim * row_bytes;
  for (size_t i = 0; i < order.size(); ++i) {
    std::copy_n(src + order[i] * block, block, out.data() + i * block);
  }
  return out;
}

bool LlamaModel::load_weight(const std::string& name, const TensorView& tensor,
                             const std::shared_ptr<const void>& mapping) {
  if (config_.tie_word_embeddings && name == "lm_head.weight") return false;  // stored by some tied checkpoints
  auto it = slots_.find(name);
  LSERVE_CHECK(it != slots_.end(), "unexpected weight '", name, "' for ", config_.architecture);
  LSERVE_CHECK(!loaded_.count(name), "weight '", name, "' loaded twice");
  const Slot& slot = it->second;
  LSERVE_CHECK(tensor.ndim == static_cast<int>(slot.shape.size()), "weight '", name, "' has shape ",
               tensor.shape_str(), ", expected ", shape_str(slot.shape));
  for (int d = 0; d < tensor.ndim; ++d) {
    LSERVE_CHECK(tensor.shape[d] == slot.shape[d], "weight '", name, "' has shape ", tensor.shape_str(),
                 ", expected ", shape_str(slot.shape));
  }
  // Sparse attention serves each layer's KV heads reordered (dense first): q/k/v/o are reordered on the way in.
  const std::string attn = ".self_attn.";
  const size_t attn_at = name.find(attn);
  int layer_idx = -1;
  bool reorder = false;
  if (sparsity_.enabled && name.rfind("model.layers.", 0) == 0 && attn_at != std::string::npos) {
    layer_idx = std::stoi(name.substr(13, attn_at - 13));
    const std::vector<int>& order = layers_[layer_idx].kv_order;
    for (size_t i = 0; i < order.size(); ++i) reorder = reorder || order[i] != static_cast<int>(i);
    reorder = reorder && name.compare(attn_at + attn.size(), 6, "o_proj") != 0;  // o_proj stays as stored
  }
  if (!slot.tensor->defined()) {  // native weights: the first part of a matrix sets its dtype
    LSERVE_CHECK(!dtype_is_block(tensor.dtype) || tensor.shape[tensor.ndim - 1] % dtype_block_size(tensor.dtype) == 0,
                 "weight '", name, "' of dtype ", dtype_name(tensor.dtype), " has rows of ", tensor.shape[tensor.ndim - 1],
                 " items, not whole blocks");
    // A whole matrix as stored, in host memory its owner keeps: packed from there, or (embedding, or
    // a layout the backend keeps as stored) served in place (no copy).
    if (mapping && !reorder && slot.row_offset == 0 && slot.shape == slot.matrix_shape && tensor.is_contiguous() &&
        tensor.device.type == DeviceType::kCPU && backend_.device().type == DeviceType::kCPU) {
      *slot.tensor = Tensor(std::shared_ptr<void>(std::const_pointer_cast<void>(mapping), tensor.data), tensor);
      loaded_.insert(name);
      pack_matrix(slot);
      if (slot.layout && *slot.layout != WeightLayout::kRows) return false;  // the packed copy replaced the view
      weight_bytes_mapped_ += static_cast<int64_t>(tensor.nbytes());
      return true;
    }
    std::array<int64_t, kMaxDims> full{};
    std::copy(slot.matrix_shape.begin(), slot.matrix_shape.end(), full.begin());
    *slot.tensor = backend_.empty(full.data(), static_cast<int>(slot.matrix_shape.size()), tensor.dtype);
  } else if (slot.tensor->view().dtype != tensor.dtype &&
             (dtype_is_block(tensor.dtype) || dtype_is_block(slot.tensor->view().dtype))) {
    LSERVE_THROW("weight '", name, "' is ", dtype_name(tensor.dtype), " but its slot holds ",
                 dtype_name(slot.tensor->view().dtype), native_weights_ ? ": native weights need one block dtype per "
                 "fused matrix (q|k|v, gate|up); load with dtype='float32'" : ": block dtypes load only as native weights");
  }
  TensorView dst = slot.tensor->view().slice(0, slot.row_offset, slot.row_offset + slot.shape[0]);
  if (reorder) {
    const std::string kind = name.substr(attn_at + attn.size(), 6);  // q_proj | k_proj | v_proj | o_proj
    std::vector<uint8_t> permuted = permute_heads(layer_idx, kind, tensor);
    TensorView view = tensor;
    view.data = permuted.data();
    backend_.copy(dst, view);
    backend_.synchronize();  // before `permuted` goes
  } else {
    backend_.copy(dst, tensor);
  }
  loaded_.insert(name);
  if (native_weights_ && tensor.ndim == 2 && (rows_loaded_[slot.tensor] += slot.shape[0]) == slot.matrix_shape[0]) {
    pack_matrix(slot);
  }
  return false;
}

void LlamaModel::pack_matrix(const Slot& slot) {
  // embed reads the embedding's rows as stored; a tied lm_head gets its own packed copy of them.
  const bool tied_head = slot.tensor == &embed_tokens_;
  if (tied_head ? !config_.tie_word_embeddings : slot.layout == nullptr) return;
  Tensor* target = tied_head ? &lm_head_ : slot.tensor;
  WeightLayout* layout = tied_head ? &lm_head_layout_ : slot.layout;
  Tensor packed;
  *layout = backend_.pack_gemm_weight(*slot.tensor, &packed);
  if (*layout == WeightLayout::kRows) return;
  *target = std::move(packed);
  weight_bytes_packed_ += static_cast<int64_t>(target->nbytes());
}

std::vector<std::string> LlamaModel::missing_weights() const {
  std::vector<std::string> missing;
  for (const auto& entry : slots_) {
    if (!loaded_.count(entry.first)) missing.push_back(entry.first);
  }
  return missing;
}

void LlamaModel::finalize() {
  const std::vector<std::string> missing = missing_weights();
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 8; ++i) list += (i ? ", " : "") + missing[i];
    if (missing.size() > 8) list += ", ... (" + std::to_string(missing.size()) + " in all)";
    LSERVE_THROW("missing weights: ", list);
  }
  if (config_.tie_word_embeddings && lm_head_layout_ == WeightLayout::kRows) lm_head_ = embed_tokens_;
  rows_loaded_.clear();
  finalized_ = true;
}

int64_t LlamaModel::activation_bytes(int64_t num_tokens, int64_t num_logits) const {
  const int64_t act_size = static_cast<int64_t>(dtype_size(activation_dtype_));
  const int64_t hidden = config_.hidden_size, inter = config_.intermediate_size, head_dim = config_.head_dim;
  const int64_t q_width = config_.num_qo_heads * head_dim, kv_width = config_.num_kv_heads * head_dim;
  // residual (float32) + normed, qkv, attn_out, proj_out, gate_up, act (activation dtype)
  const int64_t per_token = 4 * hidden + act_size * (2 * hidden + q_width + 2 * kv_width + q_width + 3 * inter);
  const int64_t metadata = 64 * num_tokens;
  const int64_t logits = num_logits * (4 * static_cast<int64_t>(config_.vocab_size) + act_size * hidden);
  return per_token * num_tokens + metadata + logits;
}

int64_t LlamaModel::kv_bytes_per_token(DType kv_cache_dtype) const {
  int64_t dense_heads = 0;
  for (const Layer& layer : layers_) dense_heads += layer.num_dense_kv;
  int64_t bytes = 2LL * dense_heads * config_.head_dim * static_cast<int64_t>(dtype_size(kv_cache_dtype));
  if (sparsity_.enabled) {  // kmax + kmin (float32) per logical page
    bytes += (2LL * dense_heads * config_.head_dim * 4 + sparsity_.logical_page_size - 1) / sparsity_.logical_page_size;
  }
  return bytes;
}

int64_t LlamaModel::streaming_bytes_per_token(DType kv_cache_dtype) const {
  int64_t stream_heads = 0;
  for (const Layer& layer : layers_) stream_heads += config_.num_kv_heads - layer.num_dense_kv;
  return 2LL * stream_heads * config_.head_dim * static_cast<int64_t>(dtype_size(kv_cache_dtype));
}

void LlamaModel::allocate_kv_cache(int num_pages, int page_size, DType kv_cache_dtype) {
  LSERVE_CHECK(num_pages >= 1 && page_size >= 1, "KV cache needs at least one page of one token");
  LSERVE_CHECK(!sparsity_.enabled || page_size == sparsity_.physical_page_size, "sparse attention needs KV pages of "
               "physical_page_size = ", sparsity_.physical_page_size, " tokens, got ", page_size);
  for (Layer& layer : layers_) {
    if (layer.num_dense_kv == 0) continue;
    layer.k_cache = backend_.empty({num_pages, page_size, layer.num_dense_kv, config_.head_dim}, kv_cache_dtype);
    layer.v_cache = backend_.empty({num_pages, page_size, layer.num_dense_kv, config_.head_dim}, kv_cache_dtype);
    backend_.fill_zero(layer.k_cache);
    backend_.fill_zero(layer.v_cache);
    if (sparsity_.enabled) {
      const int64_t logical = page_size / sparsity_.logical_page_size;
      layer.kmax = backend_.empty({num_pages, logical, layer.num_dense_kv, config_.head_dim}, DType::kF32);
      layer.kmin = backend_.empty({num_pages, logical, layer.num_dense_kv, config_.head_dim}, DType::kF32);
      backend_.fill_zero(layer.kmax);
      backend_.fill_zero(layer.kmin);
    }
  }
  kv_allocated_ = true;
}

std::vector<int> LlamaModel::num_dense_kv_heads() const {
  std::vector<int> heads;
  for (const Layer& layer : layers_) heads.push_back(layer.num_dense_kv);
  return heads;
}

void LlamaModel::allocate_streaming_cache(int num_pages, int page_size, DType kv_cache_dtype) {
  LSERVE_CHECK(sparsity_.enabled, "allocate_streaming_cache() without sparse attention");
  LSERVE_CHECK(num_pages >= 1 && page_size >= 1, "streaming cache needs pages");
  for (Layer& layer : layers_) {
    const int num_stream = config_.num_kv_heads - layer.num_dense_kv;
    if (num_stream > 0) {
      layer.ks_cache = backend_.empty({num_pages, page_size, num_stream, config_.head_dim}, kv_cache_dtype);
      layer.vs_cache = backend_.empty({num_pages, page_size, num_stream, config_.head_dim}, kv_cache_dtype);
      backend_.fill_zero(layer.ks_cache);
      backend_.fill_zero(layer.vs_cache);
    }
  }
  streaming_allocated_ = true;
}

void LlamaModel::copy_kv_page(int src_page, int dst_page) {
  LSERVE_CHECK(kv_allocated_, "copy_kv_page() before allocate_kv_cache()");
  for (Layer& layer : layers_) {
    for (Tensor* cache : {&layer.k_cache, &layer.v_cache, &layer.kmax, &layer.kmin}) {
      if (!cache->defined()) continue;
      const TensorView all = cache->view();
      LSERVE_CHECK(src_page >= 0 && src_page < all.size(0) && dst_page >= 0 && dst_page < all.size(0),
                   "copy_kv_page: pages ", src_page, " -> ", dst_page, " outside [0, ", all.size(0), ")");
      backend_.copy(all.select_row(dst_page), all.select_row(src_page));
    }
  }
}

void LlamaModel::copy_streaming_pages(int src_page, int dst_page, int num_pages) {
  LSERVE_CHECK(streaming_allocated_, "copy_streaming_pages() before allocate_streaming_cache()");
  for (Layer& layer : layers_) {
    for (Tensor* cache : {&layer.ks_cache, &layer.vs_cache}) {
      if (!cache->defined()) continue;
      const TensorView all = cache->view();
      LSERVE_CHECK(src_page >= 0 && dst_page >= 0 && src_page + num_pages <= all.size(0) &&
                   dst_page + num_pages <= all.size(0), "copy_streaming_pages: ", num_pages, " pages ", src_page,
                   " -> ", dst_page, " outside [0, ", all.size(0), ")");
      backend_.copy(all.slice(0, dst_page, dst_page + num_pages), all.slice(0, src_page, src_page + num_pages));
    }
  }
}

void LlamaModel::prepare_steps(int64_t max_tokens, int64_t max_seqs, int64_t max_pages) {
  LSERVE_CHECK(max_tokens >= 1 && max_seqs >= 1 && max_pages >= 1, "prepare_steps: capacities must be >= 1");
  step_layout_ = StepLayout{max_tokens, max_seqs, max_pages, sparsity_.enabled};
  step_metadata_ = backend_.empty({step_layout_.num_bytes()}, DType::kU8);
  // Reordered layers: row t * H + j of the ordered output takes row t * H + (serving position of
  // query head j) of the attention's output.
  const int64_t num_qo = config_.num_qo_heads, group = num_qo / config_.num_kv_heads;
  for (Layer& layer : layers_) {
    layer.unpermute = Tensor();
    if (!sparsity_.enabled) continue;
    std::vector<int32_t> position(static_cast<size_t>(num_qo));
    bool identity = true;
    for (size_t i = 0; i < layer.kv_order.size(); ++i) {
      for (int64_t g = 0; g < group; ++g) {
        position[static_cast<size_t>(layer.kv_order[i] * group + g)] = static_cast<int32_t>(i * group + g);
      }
      identity = identity && layer.kv_order[i] == static_cast<int>(i);
    }
    if (identity) continue;
    LSERVE_CHECK(max_tokens * num_qo <= INT32_MAX, "prepare_steps: ", max_tokens, " tokens x ", num_qo,
                 " heads exceed int32 row indices");
    std::vector<int32_t> rows(static_cast<size_t>(max_tokens * num_qo));
    for (int64_t t = 0; t < max_tokens; ++t) {
      for (int64_t j = 0; j < num_qo; ++j) {
        rows[static_cast<size_t>(t * num_qo + j)] = static_cast<int32_t>(t * num_qo) + position[static_cast<size_t>(j)];
      }
    }
    layer.unpermute = backend_.empty({max_tokens * num_qo}, DType::kI32);
    backend_.copy(layer.unpermute, TensorView(rows.data(), DType::kI32, {max_tokens * num_qo}));
    backend_.synchronize();  // before `rows` goes
  }
}

std::vector<float> LlamaModel::forward(const ForwardBatch& batch) {
  const TensorView logits = forward_logits(batch);
  if (!logits.defined() || logits.numel() == 0) return {};
  std::vector<float> host(static_cast<size_t>(logits.numel()));
  backend_.copy(TensorView(host.data(), DType::kF32, {logits.size(0), logits.size(1)}), logits);
  backend_.synchronize();
  return host;
}

TensorView LlamaModel::forward_logits(const ForwardBatch& batch) {
  LSERVE_CHECK(finalized_, "forward() before finalize(): weights are not all loaded");
  LSERVE_CHECK(kv_allocated_, "forward() before allocate_kv_cache()");
  LSERVE_CHECK(step_metadata_.defined(), "forward() before prepare_steps()");
  LSERVE_CHECK(!sparsity_.enabled || (streaming_allocated_ && selector_ != nullptr),
               "sparse forward() before allocate_streaming_cache() and set_page_selector()");
  const int64_t num_tokens = batch.num_tokens();
  const int64_t hidden = config_.hidden_size, head_dim = config_.head_dim;
  const int64_t q_width = config_.num_qo_heads * head_dim, kv_width = config_.num_kv_heads * head_dim;
  const int64_t num_logits = static_cast<int64_t>(batch.logits_rows.size());
  const int64_t inter = config_.intermediate_size, vocab = config_.vocab_size;
  step_logits_ = Tensor();
  last_pages_selected_ = 0;
  last_pages_total_ = 0;
  if (num_tokens == 0) return TensorView();
  if (sparsity_.enabled) {
    int64_t dense_heads = 0;
    for (const Layer& layer : layers_) dense_heads += layer.num_dense_kv;
    last_pages_selected_ = batch.sparse.pages_read_per_head * dense_heads;
    last_pages_total_ = batch.sparse.pages_total_per_head * dense_heads;
  }
  if (graphs_ && graphs_->eligible(batch)) return graphs_->replay(batch);

  // Activations, then the metadata in one copy into the persistent block; then only ops.
  const DType act_dtype = activation_dtype_;
  Tensor residual = backend_.empty({num_tokens, hidden}, DType::kF32);
  Tensor normed = backend_.empty({num_tokens, hidden}, act_dtype);
  Tensor qkv = backend_.empty({num_tokens, q_width + 2 * kv_width}, act_dtype);
  Tensor attn_out = backend_.empty({num_tokens, q_width}, act_dtype);
  Tensor proj_out = backend_.empty({num_tokens, hidden}, act_dtype);
  Tensor gate_up = backend_.empty({num_tokens, 2 * inter}, act_dtype);
  Tensor act = backend_.empty({num_tokens, inter}, act_dtype);
  Tensor selected, logits;
  if (num_logits > 0) {
    selected = backend_.empty({num_logits, hidden}, act_dtype);
    logits = backend_.empty({num_logits, vocab}, DType::kF32);
  }
  const PackedUpload packed = step_layout_.pack(batch);
  packed.copy_into(backend_, step_metadata_);
  StepTensors t;
  step_layout_.views(packed, step_metadata_, &t);
  t.residual = residual.view();
  t.normed = normed.view();
  t.qkv = qkv.view();
  t.attn_out = attn_out.view();
  t.proj_out = proj_out.view();
  t.gate_up = gate_up.view();
  t.act = act.view();
  if (num_logits > 0) {
    t.selected = selected.view();
    t.logits = logits.view();
  }
  const LengthHints hints = length_hints(batch);
  enqueue_forward(t, hints.max_q_len, hints.max_kv_len);
  if (num_logits == 0) return TensorView();
  step_logits_ = logits;
  return step_logits_.view();
}

void LlamaModel::enqueue_forward(const StepTensors& t, int32_t max_q_len, int32_t max_kv_len) {
  const int64_t num_tokens = t.token_ids.size(0);
  const int64_t head_dim = config_.head_dim;
  const int64_t num_qo_heads = config_.num_qo_heads, num_kv_heads = config_.num_kv_heads;
  const int64_t q_width = num_qo_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const int64_t group = num_qo_heads / num_kv_heads;
  const bool sparse = sparsity_.enabled;
  LengthHints hints;
  hints.max_q_len = max_q_len;
  hints.max_kv_len = max_kv_len;

  // qkv rows hold [q heads | k heads | v heads]; views split them without copies.
  auto head_view = [&](int64_t column_start, int64_t num_heads) {
    TensorView view = t.qkv.slice(1, column_start, column_start + num_heads * head_dim);
    view.ndim = 3;
    view.shape = {num_tokens, num_heads, head_dim, 0, 0, 0};
    view.strides = {t.qkv.strides[0], head_dim, 1, 0, 0, 0};
    return view;
  };
  const TensorView query = head_view(0, num_qo_heads);
  const TensorView key = head_view(q_width, num_kv_heads);
  const TensorView value = head_view(q_width + kv_width, num_kv_heads);
  TensorView attn_out_3d = t.attn_out.reshape({num_tokens, num_qo_heads, head_dim});
  LSERVE_CHECK(t.qkv.is_contiguous(), "forward: the qkv buffer must be contiguous (it holds the reordered heads' "
               "attention output before o_proj)");
  const float sm_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const float eps = static_cast<float>(config_.rms_norm_eps);

  struct Isolated {  // the per-layer region: ops only (Backend::begin_isolated)
    Backend& backend;
    explicit Isolated(Backend& b) : backend(b) { backend.begin_isolated(); }
    ~Isolated() { backend.end_isolated(); }
  } isolated(backend_);

  backend_.embed({t.token_ids, embed_tokens_, t.residual});
  for (size_t layer_idx = 0; layer_idx < layers_.size(); ++layer_idx) {
    Layer& layer = layers_[layer_idx];
    if (layer_idx == 0) {
      backend_.rms_norm({t.residual, TensorView(), layer.input_norm, t.normed, eps});
    } else {  // residual += mlp output of the previous layer; normed = norm(residual)
      backend_.rms_norm({t.proj_out, t.residual, layer.input_norm, t.normed, eps});
    }
    backend_.gemm({t.normed, layer.qkv_weight, config_.attention_bias ? layer.qkv_bias.view() : TensorView(), t.qkv,
                   layer.qkv_layout});
    if (!sparse) {
      backend_.rope_kv_append({query, key, value, t.positions, cos_sin_cache_, layer.k_cache, layer.v_cache,
                               t.slot_mapping, {}});
      backend_.attention(attention_args(query, layer.k_cache, layer.v_cache, t.qo_indptr, t.kv_page_indptr,
                                        t.kv_page_indices, t.kv_lens, attn_out_3d, sm_scale, hints));
    } else {
      // Heads are served reordered: KV heads [0, nd) are dense, [nd, num_kv_heads) stream; their
      // query heads are [0, nd * group) and the rest.
      const int64_t nd = layer.num_dense_kv, nq_dense = nd * group;
      if (nd > 0) {
        const TensorView dense_query = query.slice(1, 0, nq_dense), dense_key = key.slice(1, 0, nd);
        backend_.rope_kv_append({dense_query, dense_key, value.slice(1, 0, nd), t.positions, cos_sin_cache_,
                                 layer.k_cache, layer.v_cache, t.slot_mapping, {}});
        backend_.page_stats_append({dense_key, t.slot_mapping, layer.kmax, layer.kmin,
                                    sparsity_.physical_page_size});
        // Fresh sequences score their pages into the selector's store; the others keep theirs.
        PageSelectArgs select{dense_query,
                              layer.kmax,
                              layer.kmin,
                              t.kv_page_indptr,
                              t.kv_page_indices,
                              t.kv_lens,
                              selector_->selection(static_cast<int>(layer_idx)),
                              selector_->selection_count(static_cast<int>(layer_idx)),
                              sparsity_.physical_page_size,
                              sparsity_.always_select_sink_page,
                              sparsity_.page_score,
                              sparsity_.group_score,
                              sparsity_.page_score_spread,
                              t.qo_indptr,
                              t.select_mode,
                              t.select_slot,
                              sparsity_.recent_pages(),
                              selector_->head_num_select(static_cast<int>(layer_idx))};
        backend_.page_select(select);
        AttentionArgs args = attention_args(dense_query, layer.k_cache, layer.v_cache, t.qo_indptr,
                                            t.kv_page_indptr, t.kv_page_indices, t.kv_lens,
                                            attn_out_3d.slice(1, 0, nq_dense), sm_scale, hints);
        args.selection = select.selected;
        args.selection_count = select.num_selected;
        args.select_slot = t.select_slot;
        args.select_base = t.select_base;
        backend_.attention(args);
      }
      if (nd < num_kv_heads) {
        const TensorView stream_query = query.slice(1, nq_dense, num_qo_heads);
        RopeKvAppendArgs append{stream_query, key.slice(1, nd, num_kv_heads), value.slice(1, nd, num_kv_heads),
                                t.positions, cos_sin_cache_, layer.ks_cache, layer.vs_cache, t.stream_slot_mapping,
                                t.stream_mirror_mapping};
        backend_.rope_kv_append(append);
        AttentionArgs args = attention_args(stream_query, layer.ks_cache, layer.vs_cache, t.qo_indptr, TensorView(),
                                            TensorView(), t.kv_lens, attn_out_3d.slice(1, nq_dense, num_qo_heads),
                                            sm_scale, hints);
        args.stream_ring = t.stream_ring;
        args.window_sink = t.window_sink;
        args.window_local = t.window_local;
        backend_.attention(args);
      }
    }
    if (layer.unpermute.defined()) {
      // Heads back in their original order, into the qkv buffer (dead after attention), so that
      // o_proj sums over them in dense attention's order: the same bits as dense when every page is read.
      TensorView heads = t.attn_out.reshape({num_tokens * num_qo_heads, head_dim});
      TensorView ordered = t.qkv;
      ordered.ndim = 2;
      ordered.shape = {num_tokens * num_qo_heads, head_dim, 0, 0, 0, 0};
      ordered.strides = {head_dim, 1, 0, 0, 0, 0};
      backend_.gather_rows({heads, layer.unpermute.view().slice(0, 0, num_tokens * num_qo_heads), ordered});
      backend_.gemm({ordered.reshape({num_tokens, q_width}), layer.o_weight, TensorView(), t.proj_out, layer.o_layout});
    } else {
      backend_.gemm({t.attn_out, layer.o_weight, TensorView(), t.proj_out, layer.o_layout});
    }
    backend_.rms_norm({t.proj_out, t.residual, layer.post_norm, t.normed, eps});
    backend_.gemm({t.normed, layer.gate_up_weight, TensorView(), t.gate_up, layer.gate_up_layout});
    backend_.silu_mul({t.gate_up, t.act});
    backend_.gemm({t.act, layer.down_weight, TensorView(), t.proj_out, layer.down_layout});
  }
  backend_.rms_norm({t.proj_out, t.residual, final_norm_, t.normed, eps});
  if (!t.logits.defined()) return;
  backend_.gather_rows({t.normed, t.logits_rows, t.selected});
  backend_.gemm({t.selected, lm_head_, TensorView(), t.logits, lm_head_layout_});
}

std::vector<int> LlamaModel::decode_graph_batch_sizes() const {
  return graphs_ ? graphs_->batch_sizes() : std::vector<int>{};
}

void LlamaModel::capture_decode_graphs(int max_batch, int max_kv_len) {
  LSERVE_CHECK(finalized_ && kv_allocated_ && step_metadata_.defined(),
               "capture_decode_graphs() before the weights, KV cache and step buffers are ready");
  LSERVE_CHECK(!config_.attention_bias, "decode graphs do not cover models with attention biases yet");
  const int page_size = static_cast<int>(layers_[0].k_cache.view().size(1));
  auto graphs = std::make_unique<DecodeGraphRunner>(backend_, config_, activation_dtype_, step_layout_, step_metadata_,
                                                    page_size, max_batch, max_kv_len);
  graphs->capture([this](const StepTensors& t, int32_t max_q_len, int32_t max_kv) {
    enqueue_forward(t, max_q_len, max_kv);
  });
  graphs_ = std::move(graphs);
}

}  // namespace lserve
