// page_select and page_stats_append on CUDA: Args -> params, dispatch on the query/key dtype
// (float32, bfloat16, float16: CudaBackend has low-precision activations, so Backend passes them as
// they are), launches on the backend's stream. No host sync and no per-call allocation once the
// page-score workspace has grown (graph-capturable). Device metadata is never read back: fresh rows
// the CPU reference would reject get num_selected = -1, rows of dense and reuse sequences are left
// alone, slots beyond the pages are skipped (see ops/page_select.cuh).
#include <climits>

#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/page_select.cuh"

namespace lserve {

static_assert(cuda::kSelectFresh == kSelectFresh, "the device kernels' fresh mode is SelectMode::kSelectFresh");
static_assert(cuda::page_select_detail::kScoreBound == static_cast<int>(PageScore::kBound) &&
                  cuda::page_select_detail::kScoreCenter == static_cast<int>(PageScore::kCenter) &&
                  cuda::page_select_detail::kScoreBlend == static_cast<int>(PageScore::kBlend),
              "the device score kernels' modes are PageScore's values");

void cuda_page_select(CudaBackend& backend, const PageSelectArgs& args) {
  cuda::PageSelectParams params;
  params.query = args.query.data;
  params.kmax = args.kmax.data_ptr<float>();
  params.kmin = args.kmin.data_ptr<float>();
  params.kv_page_indptr = args.kv_page_indptr.data_ptr<int32_t>();
  params.kv_page_indices = args.kv_page_indices.data_ptr<int32_t>();
  params.kv_lens = args.kv_lens.data_ptr<int32_t>();
  params.qo_indptr = args.qo_indptr.defined() ? args.qo_indptr.data_ptr<int32_t>() : nullptr;
  params.select_mode = args.select_mode.defined() ? args.select_mode.data_ptr<int32_t>() : nullptr;
  params.select_slot = args.select_slot.defined() ? args.select_slot.data_ptr<int32_t>() : nullptr;
  params.selected = args.selected.data_ptr<int32_t>();
  params.num_selected = args.num_selected.data_ptr<int32_t>();
  params.query_stride = args.query.stride(0);
  params.num_rows = args.query.size(0);
  params.num_seqs = args.kv_page_indptr.size(0) - 1;
  params.num_slots = args.selected.size(0);
  params.num_kv_heads = args.kmax.size(2);
  params.group = args.query.size(1) / params.num_kv_heads;  // validate: a multiple
  params.head_dim = args.query.size(2);
  params.num_pages = args.kmax.size(0);
  params.logical_per_page = args.kmax.size(1);
  params.physical_page_size = args.physical_page_size;
  params.logical_page_size = args.physical_page_size / params.logical_per_page;  // validate: divides
  params.num_entries = args.kv_page_indices.size(0);
  LSERVE_CHECK(args.selected.size(2) <= INT32_MAX, "page_select: num_select ", args.selected.size(2),
               " exceeds int32");
  params.num_select = static_cast<int>(args.selected.size(2));
  params.keep_first_page = args.keep_first_page;
  params.keep_last_pages = args.keep_last_pages;
  params.head_num_select = args.head_num_select.defined() ? args.head_num_select.data_ptr<int32_t>() : nullptr;
  params.score = static_cast<int>(args.score);  // cuda::kScore* are PageScore's values
  params.spread = args.spread;
  params.group_max = args.group_score == GroupScore::kMax;
  LSERVE_CHECK(params.num_seqs * params.num_kv_heads <= INT32_MAX &&
                   params.num_entries * params.logical_per_page * params.num_kv_heads <= INT32_MAX,
               "page_select: ", params.num_seqs, " sequences, ", params.num_entries, " pages exceed the CUDA grid");

  Tensor scratch;
  params.page_keys = static_cast<uint32_t*>(backend.workspace(CudaBackend::Workspace::kPageSelect,
                                                              cuda::page_select_workspace_bytes(params), &scratch));
  dispatch_float(args.query.dtype, "page_select", [&](auto query_tag) {
    LSERVE_CUDA_CHECK(cuda::launch_page_select<decltype(query_tag)>(params, backend.stream()));
  });
}

void cuda_page_stats_append(CudaBackend& backend, const PageStatsAppendArgs& args) {
  cuda::PageStatsAppendParams params;
  params.key = args.key.data;
  params.slot_mapping = args.slot_mapping.data_ptr<int64_t>();
  params.kmax = args.kmax.data_ptr<float>();
  params.kmin = args.kmin.data_ptr<float>();
  params.key_stride = args.key.stride(0);
  params.num_tokens = args.key.size(0);
  params.num_kv_heads = args.key.size(1);
  params.head_dim = args.key.size(2);
  params.num_slots = args.kmax.size(0) * args.physical_page_size;
  params.logical_page_size = args.physical_page_size / args.kmax.size(1);  // validate: divides
  LSERVE_CHECK(params.num_tokens <= INT32_MAX, "page_stats_append: ", params.num_tokens,
               " tokens exceed the CUDA grid");
  dispatch_float(args.key.dtype, "page_stats_append", [&](auto key_tag) {
    LSERVE_CUDA_CHECK(cuda::launch_page_stats_append<decltype(key_tag)>(params, backend.stream()));
  });
}

}  // namespace lserve
