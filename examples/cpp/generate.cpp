// lserve_generate: loads a GGUF model with the C++ Engine and greedily continues a prompt given
// as token ids. Usage: lserve_generate MODEL.gguf MAX_TOKENS ID [ID ...]
// Prints the generated token ids, space-separated, on one line.
#include <cstdlib>
#include <iostream>
#include <vector>

#include "lserve/engine.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.gguf MAX_TOKENS TOKEN_ID [TOKEN_ID ...]\n";
    return 2;
  }
  try {
    lserve::EngineConfig config;
    config.max_model_len = 2048;
    auto engine = lserve::Engine::from_gguf(argv[1], config);

    lserve::SamplingParams params;
    params.temperature = 0.0f;  // greedy
    params.max_tokens = std::atoi(argv[2]);
    std::vector<int32_t> prompt;
    for (int i = 3; i < argc; ++i) prompt.push_back(static_cast<int32_t>(std::atol(argv[i])));

    const auto outputs = engine->generate({prompt}, params);
    for (size_t i = 0; i < outputs[0].size(); ++i) std::cout << (i ? " " : "") << outputs[0][i];
    std::cout << "\n";
  } catch (const lserve::Error& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
