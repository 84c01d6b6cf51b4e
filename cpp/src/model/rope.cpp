// Rotary tables per Hugging Face's rope rules (transformers modeling_rope_utils.py):
// default, linear (positions / factor), llama3 (wavelength-banded frequency scaling) and yarn
// (NTK-by-parts interpolation with a linear ramp and an attention scaling factor).
#include "lserve/model/rope.h"

#include <algorithm>
#include <cmath>

#include "lserve/check.h"

namespace lserve {

namespace {

constexpr double kPi = 3.14159265358979323846;

double yarn_get_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

RopeFrequencies rope_frequencies(const ModelConfig& config) {
  const int rotary_dim = config.rotary_dim();
  const int half = rotary_dim / 2;
  const double base = config.rope_theta;
  RopeFrequencies out;
  out.inv_freq.resize(half);
  // float32 like transformers (1.0 / base ** (arange(0, dim, 2).float() / dim)), so that angles at
  // long positions agree to the last bit of the float32 product.
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    out.inv_freq[i] = 1.0f / std::pow(static_cast<float>(base), exponent);
  }

  const RopeScaling& scaling = config.rope_scaling;
  const std::string& type = scaling.rope_type;
  if (type == "default") return out;
  if (type == "linear") {
    for (double& f : out.inv_freq) f /= scaling.factor;
    return out;
  }
  const double original_max = scaling.original_max_position_embeddings > 0
                                  ? scaling.original_max_position_embeddings
                                  : config.max_position_embeddings;
  if (type == "llama3") {
    const double low_freq_wavelen = original_max / scaling.low_freq_factor;
    const double high_freq_wavelen = original_max / scaling.high_freq_factor;
    for (double& f : out.inv_freq) {
      const double wavelen = 2.0 * kPi / f;
      if (wavelen > low_freq_wavelen) {
        f = f / scaling.factor;
      } else if (wavelen >= high_freq_wavelen) {  // medium band: smooth interpolation
        const double smooth = (original_max / wavelen - scaling.low_freq_factor) /
                              (scaling.high_freq_factor - scaling.low_freq_factor);
        f = (1.0 - smooth) * f / scaling.factor + smooth * f;
      }
    }
    return out;
  }
  if (type == "yarn") {
    const double factor = scaling.factor;
    if (scaling.attention_factor > 0) {
      out.attention_scaling = scaling.attention_factor;
    } else if (scaling.mscale > 0 && scaling.mscale_all_dim > 0) {
      out.attention_scaling = yarn_get_mscale(factor, scaling.mscale) / yarn_get_mscale(factor, scaling.mscale_all_dim);
    } else {
      out.attention_scaling = yarn_get_mscale(factor, 1.0);
    }
    auto correction_dim = [&](double num_rotations) {
      return (rotary_dim * std::log(original_max / (num_rotations * 2.0 * kPi))) / (2.0 * std::log(base));
    };
    double low = correction_dim(scaling.beta_fast), high = correction_dim(scaling.beta_slow);
    if (scaling.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(rotary_dim - 1));
    if (low == high) high += 0.001;  // avoid a division by zero in the ramp
    for (int i = 0; i < half; ++i) {
      const double pos_freq = std::pow(base, (2.0 * i) / rotary_dim);
      const double extrapolation = 1.0 / pos_freq, interpolation = 1.0 / (factor * pos_freq);
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double extrapolation_factor = 1.0 - ramp;
      out.inv_freq[i] = interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor;
    }
    return out;
  }
  LSERVE_THROW("unsupported rope_scaling type '", type, "'");
}

std::vector<float> rope_cos_sin_cache(const ModelConfig& config, int max_positions) {
  const RopeFrequencies freqs = rope_frequencies(config);
  const int half = static_cast<int>(freqs.inv_freq.size());
  std::vector<float> table(static_cast<size_t>(max_positions) * 2 * half);
  for (int p = 0; p < max_positions; ++p) {
    for (int i = 0; i < half; ++i) {
      // transformers computes the angle in float32: inv_freq (f32) * position (f32).
      const float angle = static_cast<float>(freqs.inv_freq[i]) * static_cast<float>(p);
      table[static_cast<size_t>(p) * 2 * half + i] =
          static_cast<float>(std::cos(angle) * freqs.attention_scaling);
      table[static_cast<size_t>(p) * 2 * half + half + i] =
          static_cast<float>(std::sin(angle) * freqs.attention_scaling);
    }
  }
  return table;
}

}  // namespace lserve
