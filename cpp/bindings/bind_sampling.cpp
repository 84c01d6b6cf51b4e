// Placeholder: the sampling bindings are being written.
#include "bindings.h"

namespace lserve::bindings {

void bind_sampling(pybind11::module_& m) {}

}  // namespace lserve::bindings
