// Placeholder until the CPU backend lands.
#include "lserve/backend.h"

namespace lserve {

std::unique_ptr<Backend> make_cpu_backend(int num_threads) { LSERVE_THROW("CPU backend not built yet"); }

}  // namespace lserve
