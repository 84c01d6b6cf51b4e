// LlamaModel: weight layout, strict loading and the forward pass over Backend ops.
#include "lserve/model/llama.h"

#include <cmath>

#include "lserve/model/rope.h"

namespace lserve {

namespace {

std::string layer_prefix(int layer_idx) { return "model.layers." + std::to_string(layer_idx) + "."; }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + ")";
}

}  // namespace

LlamaModel::LlamaModel(const ModelConfig& config, Backend& backend, DType weight_dtype, int max_positions)
    : config_(config),
      backend_(backend),
      weight_dtype_(weight_dtype),
      activation_dtype_(backend.activation_dtype(weight_dtype)) {
  config_.validate();
  LSERVE_CHECK(weight_dtype == DType::kF32 || weight_dtype == DType::kBF16 || weight_dtype == DType::kF16,
               "weight dtype must be float32, bfloat16 or float16, got ", dtype_name(weight_dtype));
  LSERVE_CHECK(max_positions >= 1, "max_positions must be >= 1, got ", max_positions);
  const int64_t hidden = config_.hidden_size, inter = config_.intermediate_size, head_dim = config_.head_dim;
  const int64_t q_rows = config_.num_qo_heads * head_dim, kv_rows = config_.num_kv_heads * head_dim;

  embed_tokens_ = backend_.empty({config_.vocab_size, hidden}, weight_dtype);
  slots_["model.embed_tokens.weight"] = {&embed_tokens_, 0, {config_.vocab_size, hidden}};
  final_norm_ = backend_.empty({hidden}, DType::kF32);
  slots_["model.norm.weight"] = {&final_norm_, 0, {hidden}};
  if (config_.tie_word_embeddings) {
    lm_head_ = embed_tokens_;
  } else {
    lm_head_ = backend_.empty({config_.vocab_size, hidden}, weight_dtype);
    slots_["lm_head.weight"] = {&lm_head_, 0, {config_.vocab_size, hidden}};
  }

  layers_.resize(config_.num_layers);
  for (int layer_idx = 0; layer_idx < config_.num_layers; ++layer_idx) {
    Layer& layer = layers_[layer_idx];
    const std::string prefix = layer_prefix(layer_idx);
    layer.input_norm = backend_.empty({hidden}, DType::kF32);
    layer.post_norm = backend_.empty({hidden}, DType::kF32);
    layer.qkv_weight = backend_.empty({q_rows + 2 * kv_rows, hidden}, weight_dtype);
    layer.o_weight = backend_.empty({hidden, q_rows}, weight_dtype);
    layer.gate_up_weight = backend_.empty({2 * inter, hidden}, weight_dtype);
    layer.down_weight = backend_.empty({hidden, inter}, weight_dtype);
    slots_[prefix + "input_layernorm.weight"] = {&layer.input_norm, 0, {hidden}};
    slots_[prefix + "post_attention_layernorm.weight"] = {&layer.post_norm, 0, {hidden}};
    slots_[prefix + "self_attn.q_proj.weight"] = {&layer.qkv_weight, 0, {q_rows, hidden}};
    slots_[prefix + "self_attn.k_proj.weight"] = {&layer.qkv_weight, q_rows, {kv_rows, hidden}};
    slots_[prefix + "self_attn.v_proj.weight"] = {&layer.qkv_weight, q_rows + kv_rows, {kv_rows, hidden}};
    slots_[prefix + "self_attn.o_proj.weight"] = {&layer.o_weight, 0, {hidden, q_rows}};
    slots_[prefix + "mlp.gate_proj.weight"] = {&layer.gate_up_weight, 0, {inter, hidden}};
    slots_[prefix + "mlp.up_proj.weight"] = {&layer.gate_up_weight, inter, {inter, hidden}};
    slots_[prefix + "mlp.down_proj.weight"] = {&layer.down_weight, 0, {hidden, inter}};
    if (config_.attention_bias) {
      layer.qkv_bias = backend_.empty({q_rows + 2 * kv_rows}, DType::kF32);
      slots_[prefix + "self_attn.q_proj.bias"] = {&layer.qkv_bias, 0, {q_rows}};
      slots_[prefix + "self_attn.k_proj.bias"] = {&layer.qkv_bias, q_rows, {kv_rows}};
      slots_[prefix + "self_attn.v_proj.bias"] = {&layer.qkv_bias, q_rows + kv_rows, {kv_rows}};
    }
  }

  const std::vector<float> table = rope_cos_sin_cache(config_, max_positions);
  cos_sin_cache_ = backend_.empty({max_positions, config_.rotary_dim()}, DType::kF32);
  backend_.copy(cos_sin_cache_, TensorView(const_cast<float*>(table.data()), DType::kF32,
                                           {max_positions, config_.rotary_dim()}));
}

std::vector<std::string> LlamaModel::weight_names(const ModelConfig& config) {
  std::vector<std::string> names = {"model.embed_tokens.weight", "model.norm.weight"};
  if (!config.tie_word_embeddings) names.push_back("lm_head.weight");
  for (int layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string prefix = layer_prefix(layer_idx);
    for (const char* suffix : {"input_layernorm.weight", "post_attention_layernorm.weight",
                               "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                               "mlp.down_proj.weight"}) {
      names.push_back(prefix + suffix);
    }
    if (config.attention_bias) {
      for (const char* suffix : {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}) {
        names.push_back(prefix + suffix);
      }
    }
  }
  return names;
}

void LlamaModel::load_weight(const std::string& name, const TensorView& tensor) {
  if (config_.tie_word_embeddings && name == "lm_head.weight") return;  // stored by some tied checkpoints
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
  TensorView dst = slot.tensor->view().slice(0, slot.row_offset, slot.row_offset + slot.shape[0]);
  backend_.copy(dst, tensor);
  loaded_.insert(name);
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
  return 2LL * config_.num_layers * config_.num_kv_heads * config_.head_dim *
         static_cast<int64_t>(dtype_size(kv_cache_dtype));
}

void LlamaModel::allocate_kv_cache(int num_pages, int page_size, DType kv_cache_dtype) {
  LSERVE_CHECK(num_pages >= 1 && page_size >= 1, "KV cache needs at least one page of one token");
  for (Layer& layer : layers_) {
    layer.k_cache = backend_.empty({num_pages, page_size, config_.num_kv_heads, config_.head_dim}, kv_cache_dtype);
    layer.v_cache = backend_.empty({num_pages, page_size, config_.num_kv_heads, config_.head_dim}, kv_cache_dtype);
    backend_.fill_zero(layer.k_cache);
    backend_.fill_zero(layer.v_cache);
  }
}

Tensor LlamaModel::upload_i32(const std::vector<int32_t>& values) {
  Tensor out = backend_.empty({static_cast<int64_t>(values.size())}, DType::kI32);
  if (!values.empty()) {
    backend_.copy(out, TensorView(const_cast<int32_t*>(values.data()), DType::kI32,
                                  {static_cast<int64_t>(values.size())}));
  }
  return out;
}

Tensor LlamaModel::upload_i64(const std::vector<int64_t>& values) {
  Tensor out = backend_.empty({static_cast<int64_t>(values.size())}, DType::kI64);
  if (!values.empty()) {
    backend_.copy(out, TensorView(const_cast<int64_t*>(values.data()), DType::kI64,
                                  {static_cast<int64_t>(values.size())}));
  }
  return out;
}

std::vector<float> LlamaModel::forward(const ForwardBatch& batch) {
  LSERVE_CHECK(finalized_, "forward() before finalize(): weights are not all loaded");
  LSERVE_CHECK(layers_.empty() || layers_[0].k_cache.defined(), "forward() before allocate_kv_cache()");
  const int64_t num_tokens = static_cast<int64_t>(batch.token_ids.size());
  const int64_t hidden = config_.hidden_size, head_dim = config_.head_dim;
  const int64_t num_qo_heads = config_.num_qo_heads, num_kv_heads = config_.num_kv_heads;
  const int64_t q_width = num_qo_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const int64_t num_logits = static_cast<int64_t>(batch.logits_rows.size());
  if (num_tokens == 0) return {};

  Tensor token_ids = upload_i32(batch.token_ids);
  Tensor positions = upload_i32(batch.positions);
  Tensor slot_mapping = upload_i64(batch.slot_mapping);
  Tensor qo_indptr = upload_i32(batch.qo_indptr);
  Tensor kv_page_indptr = upload_i32(batch.kv_page_indptr);
  Tensor kv_page_indices = upload_i32(batch.kv_page_indices);
  Tensor kv_lens = upload_i32(batch.kv_lens);
  Tensor logits_rows = upload_i32(batch.logits_rows);

  const DType act_dtype = activation_dtype_;
  Tensor residual = backend_.empty({num_tokens, hidden}, DType::kF32);
  Tensor normed = backend_.empty({num_tokens, hidden}, act_dtype);
  Tensor qkv = backend_.empty({num_tokens, q_width + 2 * kv_width}, act_dtype);
  Tensor attn_out = backend_.empty({num_tokens, q_width}, act_dtype);
  Tensor proj_out = backend_.empty({num_tokens, hidden}, act_dtype);
  Tensor gate_up = backend_.empty({num_tokens, 2 * static_cast<int64_t>(config_.intermediate_size)}, act_dtype);
  Tensor act = backend_.empty({num_tokens, static_cast<int64_t>(config_.intermediate_size)}, act_dtype);

  backend_.embed({token_ids, embed_tokens_, residual});
  const float sm_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const float eps = static_cast<float>(config_.rms_norm_eps);

  // qkv rows hold [q heads | k heads | v heads]; views split them without copies.
  auto head_view = [&](int64_t column_start, int64_t num_heads) {
    TensorView view = qkv.view().slice(1, column_start, column_start + num_heads * head_dim);
    view.ndim = 3;
    view.shape = {num_tokens, num_heads, head_dim, 0, 0, 0};
    view.strides = {qkv.view().strides[0], head_dim, 1, 0, 0, 0};
    return view;
  };
  const TensorView query = head_view(0, num_qo_heads);
  const TensorView key = head_view(q_width, num_kv_heads);
  const TensorView value = head_view(q_width + kv_width, num_kv_heads);
  TensorView attn_out_3d = attn_out.view().reshape({num_tokens, num_qo_heads, head_dim});

  for (size_t layer_idx = 0; layer_idx < layers_.size(); ++layer_idx) {
    Layer& layer = layers_[layer_idx];
    if (layer_idx == 0) {
      backend_.rms_norm({residual, TensorView(), layer.input_norm, normed, eps});
    } else {  // residual += mlp output of the previous layer; normed = norm(residual)
      backend_.rms_norm({proj_out, residual, layer.input_norm, normed, eps});
    }
    backend_.gemm({normed, layer.qkv_weight, config_.attention_bias ? layer.qkv_bias.view() : TensorView(), qkv});
    backend_.rope_kv_append({query, key, value, positions, cos_sin_cache_, layer.k_cache, layer.v_cache,
                             slot_mapping});
    backend_.attention({query, layer.k_cache, layer.v_cache, qo_indptr, kv_page_indptr, kv_page_indices, kv_lens,
                        attn_out_3d, sm_scale});
    backend_.gemm({attn_out, layer.o_weight, TensorView(), proj_out});
    backend_.rms_norm({proj_out, residual, layer.post_norm, normed, eps});
    backend_.gemm({normed, layer.gate_up_weight, TensorView(), gate_up});
    backend_.silu_mul({gate_up, act});
    backend_.gemm({act, layer.down_weight, TensorView(), proj_out});
  }
  backend_.rms_norm({proj_out, residual, final_norm_, normed, eps});

  if (num_logits == 0) return {};
  Tensor selected = backend_.empty({num_logits, hidden}, act_dtype);
  backend_.gather_rows({normed, logits_rows, selected});
  Tensor logits = backend_.empty({num_logits, static_cast<int64_t>(config_.vocab_size)}, DType::kF32);
  backend_.gemm({selected, lm_head_, TensorView(), logits});
  std::vector<float> host(static_cast<size_t>(logits.numel()));
  backend_.copy(TensorView(host.data(), DType::kF32, {num_logits, static_cast<int64_t>(config_.vocab_size)}),
                logits);
  backend_.synchronize();
  return host;
}

}  // namespace lserve
