// Rotary embedding tables: inverse frequencies under each Hugging Face scaling rule
// (transformers' modeling_rope_utils.py is the reference) and the cos/sin cache that
// rope_kv_append reads: row p = [cos(p * inv_freq) * a | sin(p * inv_freq) * a], a the
// attention scaling (1 except for yarn).
#pragma once

#include <vector>

#include "lserve/model/config.h"

namespace lserve {

// (rotary_dim / 2,) inverse frequencies, and the attention scaling factor applied to cos/sin.
struct RopeFrequencies {
  std::vector<double> inv_freq;
  double attention_scaling = 1.0;
};

RopeFrequencies rope_frequencies(const ModelConfig& config);

// (max_positions, rotary_dim) row-major float32.
std::vector<float> rope_cos_sin_cache(const ModelConfig& config, int max_positions);

}  // namespace lserve
