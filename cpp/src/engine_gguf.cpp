// Engine::from_gguf: model config and weights straight from a GGUF file, no Python involved.
#include "lserve/engine.h"
#include "lserve/model/gguf.h"

namespace lserve {

std::unique_ptr<Engine> Engine::from_gguf(const std::string& path, EngineConfig config) {
  GgufFile file(path);
  ModelConfig model_config = gguf_model_config(file);
  auto engine = std::make_unique<Engine>(model_config, config);
  if (config.native_weights()) {  // copied out of the mapping, or kept as views into it (the model holds it open)
    gguf_for_each_stored_weight(file, engine->model_config(),
                                [&](const std::string& name, const TensorView& tensor,
                                    const std::shared_ptr<const void>& mapping) {
                                  return engine->load_weight(name, tensor, mapping);
                                });
  } else {
    gguf_for_each_weight(file, engine->model_config(),
                         [&](const std::string& name, const TensorView& tensor) { engine->load_weight(name, tensor); });
  }
  engine->finalize();
  return engine;
}

}  // namespace lserve
