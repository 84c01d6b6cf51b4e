// Placeholder: the engine bindings are being written.
#include "bindings.h"

namespace lserve::bindings {

void bind_engine(pybind11::module_& m) {}

}  // namespace lserve::bindings
