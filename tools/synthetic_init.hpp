// Deterministic initial values for synthetic checkpoints, and float → f16/bf16 rounding.
//
// Note [Counter-based normals]
// Element i of a tensor is a pure function of (tensor seed, i): pair i/2 comes from the
// Marsaglia polar method fed by SplitMix64 in counter mode. So the values do not depend on how
// the writer chunks a tensor, on sharding, on threads, or on the standard library's
// distributions (only on correctly rounded sqrt and a deterministic std::log).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <string_view>

namespace lema::tools {

constexpr std::uint64_t splitmix64_mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// A per-tensor seed: the run's seed combined with the tensor's name (FNV-1a).
constexpr std::uint64_t tensor_seed(std::uint64_t seed, std::string_view name) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  return splitmix64_mix(seed ^ splitmix64_mix(h));
}

/// The pair of standard normals number `pair` of the stream `seed` (see the note above).
inline void normal_pair(std::uint64_t seed, std::uint64_t pair, double& z0, double& z1) {
  constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
  constexpr double kUnit = 1.0 / 9007199254740992.0;  // 2^-53
  // Up to 256 tries per pair; the chance that all are rejected is about 0.215^256.
  for (std::uint64_t attempt = 0; attempt < 256; ++attempt) {
    const std::uint64_t counter = (pair << 8 | attempt) * 2;
    const double u =
        static_cast<double>(splitmix64_mix(seed + (counter + 1) * kGolden) >> 11) * kUnit * 2.0 -
        1.0;
    const double v =
        static_cast<double>(splitmix64_mix(seed + (counter + 2) * kGolden) >> 11) * kUnit * 2.0 -
        1.0;
    const double s = u * u + v * v;
    if (s > 0.0 && s < 1.0) {
      const double f = std::sqrt(-2.0 * std::log(s) / s);
      z0 = u * f;
      z1 = v * f;
      return;
    }
  }
  z0 = z1 = 0.0;
}

/// IEEE binary16 with round-to-nearest-even (overflow → ±inf, NaN stays NaN).
constexpr std::uint16_t float_to_f16(float value) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)
    return static_cast<std::uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520
  if (ax < 0x38800000u) {                                                    // below 2^-14
    if (ax <= 0x33000000u) return static_cast<std::uint16_t>(sign);          // <= 2^-25: ties to 0
    const std::uint32_t exponent = ax >> 23;
    const std::uint32_t mantissa = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - exponent;  // 14..24
    std::uint32_t q = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1);
    const std::uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
  std::uint32_t r = ax - 0x38000000u;  // rebias 127 → 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | (r >> 13));
}

/// bfloat16 with round-to-nearest-even (NaN stays NaN).
constexpr std::uint16_t float_to_bf16(float value) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace lema::tools
