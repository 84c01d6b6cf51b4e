// GGUF reader (v2/v3, little-endian): metadata of every value type, tensor infos, and tensor data
// read through a read-only mmap and dequantised to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
// bit-exactly as gguf-py's quants.dequantize). Format: ggml docs/gguf.md. Every read is bounds-
// checked against the file size; corrupt input raises lserve::Error naming the path and the reason.
// gguf_model_config / gguf_for_each_weight turn a llama-architecture file into a ModelConfig and
// Hugging Face-named float32 weights (transformers' modeling_gguf_pytorch_utils.py is the reference).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "lserve/model/config.h"
#include "lserve/tensor.h"

namespace lserve {

// Metadata value types, numbered as in the file.
enum class GgufValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};
const char* gguf_value_type_name(GgufValueType type);

// One metadata value. A scalar is an array of one item with is_array() false; the payload of both
// lives in the one vector that matches the (element) type:
//   integers and bool -> ints (a u64 stored bit for bit), f32/f64 -> floats, strings -> strings,
//   arrays of arrays -> arrays.
struct GgufValue {
  GgufValueType type = GgufValueType::kU8;          // kArray for arrays
  GgufValueType element_type = GgufValueType::kU8;  // the item type (== type for scalars)
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;
  std::vector<GgufValue> arrays;

  bool is_array() const { return type == GgufValueType::kArray; }
  size_t num_items() const;
};

// ggml tensor types, numbered as in ggml.h; only the ones read_f32 dequantises are named here.
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kBF16 = 30 };
// "Q4_K" etc. for every type ggml knows, "type<id>" otherwise.
std::string ggml_type_name(uint32_t type);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> shape;  // row-major (torch) order: ggml's ne reversed
  uint32_t ggml_type = 0;
  uint64_t offset = 0;         // absolute byte offset of the data in the file
  uint64_t nbytes = 0;
  int64_t numel() const;
};

class GgufFile {
 public:
  // Maps `path` read-only and parses header, metadata and tensor infos; throws on any corruption.
  explicit GgufFile(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // start of the tensor data section

  // Metadata, in file order.
  const std::vector<std::string>& keys() const { return keys_; }
  bool has_key(const std::string& key) const { return values_.count(key) != 0; }
  const GgufValue& get(const std::string& key) const;  // throws naming a missing key
  // Typed getters: throw naming the key when it is missing or holds another type.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;    // any integer type (u64 must fit int64)
  double get_float(const std::string& key) const;   // f32 or f64
  bool get_bool(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;
  std::vector<double> get_float_array(const std::string& key) const;

  // Tensors, in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool has_tensor(const std::string& name) const { return tensor_index_.count(name) != 0; }
  const GgufTensorInfo& tensor(const std::string& name) const;  // throws naming a missing tensor
  // The raw bytes of a tensor (nbytes long), inside the mapping.
  const uint8_t* tensor_data(const GgufTensorInfo& info) const;
  // The mapping's owner: it stays mapped while this file or any copy of the pointer lives (what
  // weights kept as views into the file hold on to).
  const std::shared_ptr<const void>& mapping() const { return mapping_; }

  // Dequantised float32 values, row-major over info.shape. Throws naming the tensor and its type
  // for types other than F32, F16, BF16, Q8_0, Q4_0, Q4_1.
  std::vector<float> read_f32(const std::string& name) const;
  // Same, into caller memory of numel() floats.
  void read_f32(const GgufTensorInfo& info, float* out) const;

 private:
  void parse();

  std::string path_;
  const uint8_t* data_ = nullptr;  // the mapping
  size_t size_ = 0;
  std::shared_ptr<const void> mapping_;  // unmaps data_ when the last owner goes
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::string> keys_;
  std::unordered_map<std::string, GgufValue> values_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// ModelConfig from a general.architecture == "llama" file; other architectures raise naming it.
// Fields: vocab (tokenizer.ggml.tokens length, else llama.vocab_size), llama.embedding_length,
// feed_forward_length, block_count, attention.head_count(_kv), head_dim (attention.key_length,
// else rope.dimension_count, else hidden / heads), layer_norm_rms_epsilon, rope.freq_base,
// rope.scaling.{type,factor,original_context_length,...}, context_length, tie_word_embeddings (no
// output.weight), attention_bias (blk.0.attn_q.bias present), tokenizer.ggml.{bos,eos}_token_id.
// A rope_freqs.weight tensor (Llama 3.x) is recognised as llama3 rope scaling when its values are
// the ones that rule gives, and raises otherwise.
ModelConfig gguf_model_config(const GgufFile& file);

// The Hugging Face name of a llama GGUF tensor ("blk.3.attn_q.weight" ->
// "model.layers.3.self_attn.q_proj.weight"); throws naming a tensor it cannot map.
std::string gguf_to_hf_name(const std::string& gguf_name);

// Calls fn(hf_name, weight) for every tensor in file order, with a float32 contiguous view of the
// dequantised weight in Hugging Face layout (valid during the call only): llama.cpp's rotary
// permutation of attn_q/attn_k rows is undone as transformers' LlamaTensorProcessor does. Before
// reading any data, raises naming every tensor it cannot map, a tensor whose shape disagrees with
// `config`, and a tensor the model needs that the file lacks.
void gguf_for_each_weight(const GgufFile& file, const ModelConfig& config,
                          const std::function<void(const std::string& hf_name, const TensorView& f32_tensor)>& fn);

// The same walk, with each weight matrix as stored: a view into the mapping (no copy) of dtype
// float32 | float16 | bfloat16 | q8_0 | q4_0 | q4_1; attn_q / attn_k rows are un-permuted into a
// temporary copy (rows move whole, blocks and all). 1-D tensors (norms, biases) come as float32, as
// from gguf_for_each_weight. What the engine's native weights load (EngineConfig::dtype "native").
// `mapping` is file.mapping() for a view into the file and null for a temporary; fn returns true
// when it kept the view (holding the mapping open). Once fn returns, the walk drops the matrix's
// pages from the resident set (madvise): a copy or packed copy is what stays, and a kept view
// faults back in only the pages it reads later.
void gguf_for_each_stored_weight(
    const GgufFile& file, const ModelConfig& config,
    const std::function<bool(const std::string& hf_name, const TensorView& tensor,
                             const std::shared_ptr<const void>& mapping)>& fn);

}  // namespace lserve
