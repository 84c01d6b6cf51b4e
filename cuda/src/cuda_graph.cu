// CUDA graphs on CudaBackend: stream capture of a decode step's ops, instantiation and replay,
// and the persistent split-KV workspace captured decode attention writes to.
#include "cuda_backend.h"
#include "cuda_check.h"

namespace lserve {

void CudaBackend::begin_capture() {
  activate();
  LSERVE_CHECK(!capturing_, "begin_capture(): a CUDA graph capture is already in progress");
  // Thread-local mode: only this thread's unsafe calls (e.g. a synchronous copy) end the capture
  // with an error; other threads' CUDA work is unaffected.
  LSERVE_CUDA_CHECK(cudaStreamBeginCapture(context_->stream, cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
}

std::shared_ptr<void> CudaBackend::end_capture() {
  activate();
  LSERVE_CHECK(capturing_, "end_capture() without begin_capture()");
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  LSERVE_CUDA_CHECK(cudaStreamEndCapture(context_->stream, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  LSERVE_CUDA_CHECK(status);
  ++num_graphs_;
  std::shared_ptr<CudaContext> context = context_;
  return std::shared_ptr<void>(static_cast<void*>(exec), [context](void* pointer) {
    cudaSetDevice(context->device_index);
    cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(pointer));
  });
}

void CudaBackend::replay_graph(const std::shared_ptr<void>& graph) {
  activate();
  LSERVE_CHECK(graph != nullptr, "replay_graph(): no graph");
  LSERVE_CHECK(!capturing_, "replay_graph() while capturing");
  LSERVE_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph.get()), context_->stream));
}

void* CudaBackend::workspace(Workspace which, size_t num_bytes, Tensor* scratch) {
  if (num_bytes == 0) return nullptr;
  Tensor& buffer = workspaces_[static_cast<int>(which)];
  const size_t reserved = buffer.defined() ? buffer.nbytes() : 0;
  if (num_bytes <= reserved) return buffer.data();
  LSERVE_CHECK(!capturing_, which == Workspace::kPageSelect ? "page_select" : "decode attention", " needs ",
               num_bytes, " bytes of workspace while a CUDA graph is being captured, but ", reserved,
               " are reserved: run the step once before capturing it");
  const int64_t words = static_cast<int64_t>((num_bytes + 15) / 16 * 4);  // float32 words, 16-byte multiple
  if (num_graphs_ > 0) {  // captured graphs hold the current buffer's address
    *scratch = empty({words}, DType::kF32);
    return scratch->data();
  }
  buffer = empty({words}, DType::kF32);
  return buffer.data();
}

}  // namespace lserve
