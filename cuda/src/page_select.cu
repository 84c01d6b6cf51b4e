// page_select and page_stats_append on CUDA: Args -> params, launches on the backend's stream. No
// host sync and no per-call allocation once the page-score workspace has grown (graph-capturable).
// Device metadata is never read back: rows the CPU reference would reject get num_selected = -1,
// slots beyond the pages are skipped (see ops/page_select.cuh).
#include <climits>

#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/page_select.cuh"

namespace lserve {

void cuda_page_select(CudaBackend& backend, const PageSelectArgs& args) {
  cuda::PageSelectParams params;
  params.query = args.query.data_ptr<float>();
  params.kmax = args.kmax.data_ptr<float>();
  params.kmin = args.kmin.data_ptr<float>();
  params.kv_page_indptr = args.kv_page_indptr.data_ptr<int32_t>();
  params.kv_page_indices = args.kv_page_indices.data_ptr<int32_t>();
  params.kv_lens = args.kv_lens.data_ptr<int32_t>();
  params.selected = args.selected.data_ptr<int32_t>();
  params.num_selected = args.num_selected.data_ptr<int32_t>();
  params.query_stride = args.query.stride(0);
  params.num_seqs = args.query.size(0);
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
  params.center = args.score == PageScore::kCenter;
  LSERVE_CHECK(params.num_seqs * params.num_kv_heads <= INT32_MAX &&
                   params.num_entries * params.logical_per_page * params.num_kv_heads <= INT32_MAX,
               "page_select: ", params.num_seqs, " sequences, ", params.num_entries, " pages exceed the CUDA grid");

  Tensor scratch;
  params.page_keys = static_cast<uint32_t*>(backend.workspace(CudaBackend::Workspace::kPageSelect,
                                                              cuda::page_select_workspace_bytes(params), &scratch));
  LSERVE_CUDA_CHECK(cuda::launch_page_select(params, backend.stream()));
}

void cuda_page_stats_append(CudaBackend& backend, const PageStatsAppendArgs& args) {
  cuda::PageStatsAppendParams params;
  params.key = args.key.data_ptr<float>();
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
  LSERVE_CUDA_CHECK(cuda::launch_page_stats_append(params, backend.stream()));
}

}  // namespace lserve
