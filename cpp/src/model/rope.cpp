// Rotary tables under Hugging Face's scaling rules: the same formulas as transformers'
// modeling_rope_utils.py (_compute_linear_scaling_rope_parameters, _compute_llama3_parameters,
// _compute_yarn_parameters, and the models' compute_default_rope_parameters), evaluated in double
// and stored as float32. Angles p * inv_freq are formed in double too, so large positions keep
// full float32 accuracy (transformers forms them in float32).
#include "lserve/model/rope.h"

#include <algorithm>
#include <cmath>

#include "lserve/check.h"

namespace lserve {

namespace {

constexpr double kPi = 3.14159265358979323846;

int resolved_head_dim(const ModelConfig& config) {
  if (config.head_dim > 0) return config.head_dim;
  LSERVE_CHECK(config.num_qo_heads > 0 && config.hidden_size > 0,
               "rope: head_dim is 0 and hidden_size / num_qo_heads is undefined");
  return config.hidden_size / config.num_qo_heads;
}

// base^(-i / dim) for i = 0, 2, ..., dim - 2.
std::vector<double> default_inv_freq(double base, int rotary_dim) {
  std::vector<double> inv_freq(rotary_dim / 2);
  for (int i = 0; i < rotary_dim / 2; ++i) {
    inv_freq[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / rotary_dim);
  }
  return inv_freq;
}

void apply_llama3(const RopeScaling& scaling, int original_max_positions, std::vector<double>& inv_freq) {
  LSERVE_CHECK(scaling.high_freq_factor != scaling.low_freq_factor,
               "rope: llama3 needs high_freq_factor != low_freq_factor, both are ", scaling.low_freq_factor);
  const double low_freq_wavelen = original_max_positions / scaling.low_freq_factor;
  const double high_freq_wavelen = original_max_positions / scaling.high_freq_factor;
  for (double& freq : inv_freq) {
    const double wavelen = 2.0 * kPi / freq;
    if (wavelen > low_freq_wavelen) {  // low frequencies: fully interpolated
      freq /= scaling.factor;
    } else if (wavelen >= high_freq_wavelen) {  // medium: blend between interpolated and original
      const double smooth = (original_max_positions / wavelen - scaling.low_freq_factor) /
                            (scaling.high_freq_factor - scaling.low_freq_factor);
      freq = (1.0 - smooth) * freq / scaling.factor + smooth * freq;
    }  // high frequencies: unchanged
  }
}

// YaRN: per-dimension blend of interpolation (inv_freq / factor) and extrapolation (inv_freq),
// with a linear ramp between the correction dimensions of beta_fast and beta_slow rotations.
double apply_yarn(const RopeScaling& scaling, double base, int rotary_dim, int original_max_positions,
                  std::vector<double>& inv_freq) {
  const double factor = scaling.factor;
  auto get_mscale = [](double scale, double mscale) {
    return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
  };
  double attention_factor = scaling.attention_factor;
  if (attention_factor == 0.0) {
    if (scaling.mscale != 0.0 && scaling.mscale_all_dim != 0.0) {
      attention_factor = get_mscale(factor, scaling.mscale) / get_mscale(factor, scaling.mscale_all_dim);
    } else {
      attention_factor = get_mscale(factor, 1.0);
    }
  }
  const double beta_fast = scaling.beta_fast != 0.0 ? scaling.beta_fast : 32.0;  // HF: `or 32`
  const double beta_slow = scaling.beta_slow != 0.0 ? scaling.beta_slow : 1.0;   // HF: `or 1`
  auto correction_dim = [&](double num_rotations) {
    return rotary_dim * std::log(original_max_positions / (num_rotations * 2.0 * kPi)) / (2.0 * std::log(base));
  };
  double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
  if (scaling.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(rotary_dim - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp, as transformers does
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolation_weight = 1.0 - ramp;
    const double extrapolated = inv_freq[i], interpolated = inv_freq[i] / factor;
    inv_freq[i] = interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight;
  }
  return attention_factor;
}

}  // namespace

RopeFrequencies rope_frequencies(const ModelConfig& config) {
  const int head_dim = resolved_head_dim(config);
  const int rotary_dim = static_cast<int>(head_dim * config.partial_rotary_factor);
  LSERVE_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rope: rotary_dim ", rotary_dim,
               " (head_dim ", head_dim, " x partial_rotary_factor ", config.partial_rotary_factor,
               ") must be even and in (0, head_dim]");
  LSERVE_CHECK(config.rope_theta > 0.0, "rope: rope_theta must be positive, got ", config.rope_theta);
  const RopeScaling& scaling = config.rope_scaling;
  const int original_max_positions = scaling.original_max_position_embeddings > 0
                                         ? scaling.original_max_position_embeddings
                                         : config.max_position_embeddings;

  RopeFrequencies result;
  result.inv_freq = default_inv_freq(config.rope_theta, rotary_dim);
  const std::string& type = scaling.rope_type;
  if (type == "default") return result;
  LSERVE_CHECK(scaling.factor > 0.0, "rope: ", type, " scaling needs a positive factor, got ", scaling.factor);
  if (type == "linear") {
    for (double& freq : result.inv_freq) freq /= scaling.factor;
  } else if (type == "llama3") {
    LSERVE_CHECK(original_max_positions > 0, "rope: llama3 needs original_max_position_embeddings");
    apply_llama3(scaling, original_max_positions, result.inv_freq);
  } else if (type == "yarn") {
    LSERVE_CHECK(original_max_positions > 0, "rope: yarn needs original_max_position_embeddings");
    result.attention_scaling = apply_yarn(scaling, config.rope_theta, rotary_dim, original_max_positions,
                                          result.inv_freq);
  } else {
    LSERVE_THROW("rope: unsupported rope_type '", type, "' (supported: default, linear, llama3, yarn)");
  }
  return result;
}

std::vector<float> rope_cos_sin_cache(const ModelConfig& config, int max_positions) {
  LSERVE_CHECK(max_positions >= 0, "rope: max_positions must be non-negative, got ", max_positions);
  const RopeFrequencies frequencies = rope_frequencies(config);
  const int64_t half = static_cast<int64_t>(frequencies.inv_freq.size());
  const int64_t rotary_dim = 2 * half;
  std::vector<float> cache(static_cast<size_t>(max_positions) * rotary_dim);  // (max_positions, rotary_dim)
  for (int64_t position = 0; position < max_positions; ++position) {
    float* row = cache.data() + position * rotary_dim;
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(position) * frequencies.inv_freq[i];
      row[i] = static_cast<float>(std::cos(angle) * frequencies.attention_scaling);
      row[half + i] = static_cast<float>(std::sin(angle) * frequencies.attention_scaling);
    }
  }
  return cache;
}

}  // namespace lserve
