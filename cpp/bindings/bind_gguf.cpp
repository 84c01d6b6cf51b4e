// Placeholder: the gguf bindings are being written.
#include "bindings.h"

namespace lserve::bindings {

void bind_gguf(pybind11::module_& m) {}

}  // namespace lserve::bindings
