// Device-independent parts of Backend: allocation shapes, copy and fill validation, capability
// answers the op contracts give (supports), float32 staging of low-precision activations for
// float32-only backends, the backend registry.
#include "lserve/backend.h"

#include <iterator>
#include <map>
#include <mutex>
#include <vector>

namespace lserve {

namespace {

bool is_low_precision(const TensorView& view) {
  return view.defined() && (view.dtype == DType::kBF16 || view.dtype == DType::kF16);
}

// Float32 stand-ins for bfloat16/float16 activations: input() returns a converted copy,
// output() a float32 buffer that finish() rounds back into the caller's tensor. Tensors whose
// rows are strided (views into a fused buffer) are copied row by row.
class Float32Staging {
 public:
  explicit Float32Staging(Backend& backend) : backend_(backend) {}
  TensorView input(const TensorView& view) { return stage(view, /*copy_in=*/true, /*write_back=*/false); }
  TensorView output(const TensorView& view) { return stage(view, /*copy_in=*/false, /*write_back=*/true); }
  TensorView in_out(const TensorView& view) { return stage(view, /*copy_in=*/true, /*write_back=*/true); }
  void finish() {
    for (const auto& [original, staged] : write_back_) copy_rows(original, staged);
  }

 private:
  TensorView stage(const TensorView& view, bool copy_in, bool write_back) {
    if (!is_low_precision(view)) return view;
    Tensor staged = backend_.empty(view.shape.data(), view.ndim, DType::kF32);
    if (copy_in) copy_rows(staged, view);
    if (write_back) write_back_.emplace_back(view, staged.view());
    keep_.push_back(staged);
    return staged.view();
  }
  void copy_rows(const TensorView& dst, const TensorView& src) {
    if (dst.is_contiguous() && src.is_contiguous()) {
      backend_.copy(dst, src);
      return;
    }
    for (int64_t row = 0; row < src.size(0); ++row) backend_.copy(dst.select_row(row), src.select_row(row));
  }

  Backend& backend_;
  std::vector<Tensor> keep_;
  std::vector<std::pair<TensorView, TensorView>> write_back_;
};

}  // namespace

namespace {

bool is_float(DType dtype) { return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16; }

struct OpNameEntry {
  OpKind op;
  const char* name;
};
constexpr OpNameEntry kOpNames[] = {
    {OpKind::kEmbed, "embed"},           {OpKind::kRmsNorm, "rms_norm"},         {OpKind::kGemm, "gemm"},
    {OpKind::kSiluMul, "silu_mul"},      {OpKind::kRopeKvAppend, "rope_kv_append"}, {OpKind::kAttention, "attention"},
    {OpKind::kGatherRows, "gather_rows"}, {OpKind::kSample, "sample"},          {OpKind::kLogprobs, "logprobs"},
    {OpKind::kPageSelect, "page_select"}, {OpKind::kPageStatsAppend, "page_stats_append"},
};
static_assert(std::size(kOpNames) == std::size(kAllOps), "every OpKind has a name");

bool reads_weight(OpKind op) { return op == OpKind::kEmbed || op == OpKind::kRmsNorm || op == OpKind::kGemm; }
bool reads_kv_cache(OpKind op) { return op == OpKind::kRopeKvAppend || op == OpKind::kAttention; }
bool reads_activation(OpKind op) {
  return op != OpKind::kEmbed && op != OpKind::kSample && op != OpKind::kLogprobs;
}

}  // namespace

const char* op_name(OpKind op) {
  for (const OpNameEntry& entry : kOpNames) {
    if (entry.op == op) return entry.name;
  }
  LSERVE_THROW("unknown OpKind ", static_cast<int>(op));
}

OpKind op_kind_from_name(const std::string& name) {
  std::string known;
  for (const OpNameEntry& entry : kOpNames) {
    if (name == entry.name) return entry.op;
    known += known.empty() ? entry.name : std::string(", ") + entry.name;
  }
  LSERVE_THROW("unknown op '", name, "' (known: ", known, ")");
}

OpQuery OpQuery::of(const EmbedArgs& args) {
  OpQuery query;
  query.op = OpKind::kEmbed;
  query.weight_dtype = args.weight.dtype;
  return query;
}

OpQuery OpQuery::of(const RmsNormArgs& args) {
  OpQuery query;
  query.op = OpKind::kRmsNorm;
  query.activation_dtype = args.input.dtype;
  query.weight_dtype = args.weight.dtype;
  return query;
}

OpQuery OpQuery::of(const GemmArgs& args) {
  OpQuery query;
  query.op = OpKind::kGemm;
  query.activation_dtype = args.input.dtype;
  query.weight_dtype = args.weight.dtype;
  return query;
}

OpQuery OpQuery::of(const RopeKvAppendArgs& args) {
  OpQuery query;
  query.op = OpKind::kRopeKvAppend;
  query.activation_dtype = args.query.dtype;
  query.kv_cache_dtype = args.k_cache.dtype;
  query.head_dim = args.query.size(2);
  return query;
}

OpQuery OpQuery::of(const AttentionArgs& args) {
  OpQuery query;
  query.op = OpKind::kAttention;
  query.activation_dtype = args.query.dtype;
  query.kv_cache_dtype = args.k_cache.dtype;
  query.head_dim = args.query.size(2);
  query.window = args.has_window();
  query.stream_ring = args.has_ring();
  query.selection = args.has_selection();
  return query;
}

OpQuery OpQuery::of(const PageSelectArgs& args) {
  OpQuery query;
  query.op = OpKind::kPageSelect;
  query.activation_dtype = args.query.dtype;
  query.head_dim = args.query.size(2);
  query.group_score = args.group_score;
  return query;
}

OpQuery OpQuery::of(const PageStatsAppendArgs& args) {
  OpQuery query;
  query.op = OpKind::kPageStatsAppend;
  query.activation_dtype = args.key.dtype;
  query.head_dim = args.key.size(2);
  return query;
}

Support Backend::supports(const OpQuery& query) const {
  // Called by every op entry: no string is built unless the answer is no.
  const char* op = op_name(query.op);
  // What the contracts of ops/<op>.h allow on every backend.
  if (reads_activation(query.op) && !is_float(query.activation_dtype)) {
    return Support::no(std::string(op) + ": activations are float32, bfloat16 or float16, got " +
                       dtype_name(query.activation_dtype));
  }
  // gemm and embed also take the ggml block formats (ops/gemm.h, ops/embed.h); a backend may refuse them.
  const bool block_weight_op = query.op == OpKind::kGemm || query.op == OpKind::kEmbed;
  if (reads_weight(query.op) && !is_float(query.weight_dtype) &&
      !(block_weight_op && dtype_is_block(query.weight_dtype))) {
    return Support::no(std::string(op) + ": weights are float32, bfloat16 or float16" +
                       (block_weight_op ? " (or q8_0, q4_0, q4_1 blocks)" : "") + ", got " +
                       dtype_name(query.weight_dtype));
  }
  if (reads_kv_cache(query.op) && query.kv_cache_dtype != DType::kF32 && query.kv_cache_dtype != DType::kBF16) {
    return Support::no(std::string(op) + ": KV caches are float32 or bfloat16, got " +
                       dtype_name(query.kv_cache_dtype));
  }
  if (query.head_dim < 0) {
    return Support::no(std::string(op) + ": head_dim must be >= 0, got " + std::to_string(query.head_dim));
  }
  if (query.op == OpKind::kAttention && query.stream_ring && query.selection) {
    return Support::no("attention: a selection store reads a page list, not a stream ring");
  }
  return supports_impl(query);
}

void Backend::require_support(const OpQuery& query) const {
  const Support support = supports(query);
  if (!support) throw Error("the " + name() + " backend cannot run this call: " + support.reason);
}

void Backend::embed(const EmbedArgs& args) {
  args.validate(device());
  require_support(OpQuery::of(args));
  embed_impl(args);
}

void Backend::sample(const SampleArgs& args) {
  args.validate(device());
  require_support(OpQuery{OpKind::kSample});
  sample_impl(args);
}

void Backend::logprobs(const LogprobsArgs& args) {
  args.validate(device());
  require_support(OpQuery{OpKind::kLogprobs});
  logprobs_impl(args);
}

void Backend::rms_norm(const RmsNormArgs& args) {
  args.validate(device());
  require_support(OpQuery::of(args));
  if (low_precision_activations() || !(is_low_precision(args.input) || is_low_precision(args.output))) {
    rms_norm_impl(args);
    return;
  }
  Float32Staging staging(*this);
  RmsNormArgs staged = args;
  staged.input = staging.input(args.input);
  staged.output = staging.output(args.output);
  rms_norm_impl(staged);
  staging.finish();
}

WeightLayout Backend::pack_gemm_weight(const TensorView& weight, Tensor* packed) {
  LSERVE_CHECK(packed != nullptr, "pack_gemm_weight: no output tensor");
  TensorCheck(weight, "pack_gemm_weight", "weight").ndim(2).contiguous();
  LSERVE_CHECK(weight.device.type == DeviceType::kCPU, "pack_gemm_weight: 'weight' must be in host memory, got ",
               weight.device.str());
  LSERVE_CHECK(weight.size(1) % dtype_block_size(weight.dtype) == 0, "pack_gemm_weight: a ",
               dtype_name(weight.dtype), " weight needs rows of whole blocks of ", dtype_block_size(weight.dtype),
               ", got ", weight.shape_str());
  note_isolation();
  return pack_gemm_weight_impl(weight, packed);
}

void Backend::gemm(const GemmArgs& args) {
  args.validate(device());
  require_support(OpQuery::of(args));
  if (low_precision_activations() || !(is_low_precision(args.input) || is_low_precision(args.output))) {
    gemm_impl(args);
    return;
  }
  Float32Staging staging(*this);
  GemmArgs staged = args;
  staged.input = staging.input(args.input);
  staged.output = staging.output(args.output);
  gemm_impl(staged);
  staging.finish();
}

void Backend::silu_mul(const SiluMulArgs& args) {
  args.validate(device());
  require_support(OpQuery{OpKind::kSiluMul, args.input.dtype});
  if (low_precision_activations() || !(is_low_precision(args.input) || is_low_precision(args.output))) {
    silu_mul_impl(args);
    return;
  }
  Float32Staging staging(*this);
  SiluMulArgs staged = args;
  staged.input = staging.input(args.input);
  staged.output = staging.output(args.output);
  silu_mul_impl(staged);
  staging.finish();
}

void Backend::rope_kv_append(const RopeKvAppendArgs& args) {
  args.validate(device());
  require_support(OpQuery::of(args));
  if (low_precision_activations() || !is_low_precision(args.query)) {
    rope_kv_append_impl(args);
    return;
  }
  Float32Staging staging(*this);
  RopeKvAppendArgs staged = args;
  staged.query = staging.in_out(args.query);
  staged.key = staging.in_out(args.key);
  staged.value = staging.input(args.value);
  rope_kv_append_impl(staged);
  staging.finish();
}

void Backend::attention(const AttentionArgs& args) {
  args.validate(device());
  require_support(OpQuery::of(args));
  if (low_precision_activations() || !(is_low_precision(args.query) || is_low_precision(args.output))) {
    attention_impl(args);
    return;
  }
  Float32Staging staging(*this);
  AttentionArgs staged = args;
  staged.query = staging.input(args.query);
  staged.output = staging.output(args.output);
  attention_impl(staged);
  staging.finish();
}

void Backend::gather_rows(const GatherRowsArgs& args) {
  args.validate(device());
  require_support(OpQuery{OpKind::kGatherRows, args.input.dtype});
  if (low_precision_activations() || !(is_low_precision(args.input) || is_low_precision(args.output))) {
    gather_rows_impl(args);
    return;
  }
  Float32Staging staging(*this);
  GatherRowsArgs staged = args;
  staged.input = staging.input(args.input);
  staged.output = staging.output(args.output);
  gather_rows_impl(staged);
  staging.finish();
}

Tensor Backend::empty(std::initializer_list<int64_t> shape, DType dtype) {
  std::array<int64_t, kMaxDims> dims{};
  int ndim = 0;
  for (int64_t extent : shape) {
    LSERVE_CHECK(ndim < kMaxDims, "tensor rank above ", kMaxDims);
    dims[ndim++] = extent;
  }
  return empty(dims.data(), ndim, dtype);
}

Tensor Backend::empty(const int64_t* shape, int ndim, DType dtype) {
  int64_t count = 1;
  for (int d = 0; d < ndim; ++d) {
    LSERVE_CHECK(shape[d] >= 0, "negative extent ", shape[d], " in tensor shape");
    count *= shape[d];
  }
  LSERVE_CHECK(!dtype_is_block(dtype) || (ndim >= 1 && shape[ndim - 1] % dtype_block_size(dtype) == 0),
               "a ", dtype_name(dtype), " tensor needs a last dimension that is a multiple of its block size ",
               dtype_block_size(dtype));
  note_isolation();
  // Allocate at least one byte so an empty tensor still has a distinct, valid pointer.
  auto storage = allocate_bytes(std::max<size_t>(1, dtype_nbytes(dtype, count)));
  return Tensor(storage, TensorView::contiguous(storage.get(), dtype, shape, ndim, device()));
}

void Backend::copy(const TensorView& dst, const TensorView& src) {
  note_isolation();
  LSERVE_CHECK(dst.numel() == src.numel(), "copy: dst shape ", dst.shape_str(), " and src shape ",
               src.shape_str(), " differ in size");
  LSERVE_CHECK(dst.is_contiguous() && src.is_contiguous(), "copy: both tensors must be contiguous");
  auto is_float = [](DType d) { return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16; };
  LSERVE_CHECK(dst.dtype == src.dtype || (is_float(dst.dtype) && is_float(src.dtype)), "copy: cannot convert ",
               dtype_name(src.dtype), " to ", dtype_name(dst.dtype));
  copy_impl(dst, src);
}

void Backend::fill_zero(const TensorView& dst) {
  note_isolation();
  LSERVE_CHECK(dst.device == device(), "fill_zero: tensor is on ", dst.device.str(), ", backend on ",
               device().str());
  LSERVE_CHECK(dst.is_contiguous(), "fill_zero: tensor must be contiguous");
  fill_zero_impl(dst);
}

void Backend::page_select(const PageSelectArgs& args) {
  args.validate(device());
  require_support(OpQuery::of(args));
  if (low_precision_activations() || !is_low_precision(args.query)) {
    page_select_impl(args);
    return;
  }
  Float32Staging staging(*this);
  PageSelectArgs staged = args;
  staged.query = staging.input(args.query);
  page_select_impl(staged);
}

void Backend::page_stats_append(const PageStatsAppendArgs& args) {
  args.validate(device());
  require_support(OpQuery::of(args));
  if (low_precision_activations() || !is_low_precision(args.key)) {
    page_stats_append_impl(args);
    return;
  }
  Float32Staging staging(*this);
  PageStatsAppendArgs staged = args;
  staged.key = staging.input(args.key);
  page_stats_append_impl(staged);
}

namespace {

struct BackendRegistry {
  std::mutex mutex;
  std::map<DeviceType, BackendFactory> factories;
};

BackendRegistry& registry() {
  static BackendRegistry instance;
  return instance;
}

}  // namespace

bool register_backend_factory(DeviceType type, BackendFactory factory) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  registry().factories[type] = factory;
  return true;
}

bool has_backend_factory(DeviceType type) {
  std::lock_guard<std::mutex> lock(registry().mutex);
  return registry().factories.count(type) != 0;
}

std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads) {
  if (device == "cpu") return make_cpu_backend(num_threads);
  if (device.rfind("cuda", 0) == 0) {
    int index = 0;
    if (device.size() > 4) {
      const std::string suffix = device.substr(4);
      LSERVE_CHECK(suffix.size() >= 2 && suffix[0] == ':' &&
                       suffix.find_first_not_of("0123456789", 1) == std::string::npos && suffix.size() <= 6,
                   "invalid device '", device, "' (expected 'cuda' or 'cuda:N')");
      index = std::stoi(suffix.substr(1));
    }
    BackendFactory factory = nullptr;
    {
      std::lock_guard<std::mutex> lock(registry().mutex);
      auto it = registry().factories.find(DeviceType::kCUDA);
      if (it != registry().factories.end()) factory = it->second;
    }
    LSERVE_CHECK(factory != nullptr, "device '", device, "' requested, but this build of lserve has no CUDA "
                 "backend (rebuild with a CUDA toolkit and LSERVE_CUDA=ON)");
    return factory(index);
  }
  LSERVE_THROW("unknown device '", device, "' (expected 'cpu', 'cuda' or 'cuda:N')");
}

}  // namespace lserve
