// The keys and values a decoder has computed for the positions run so far, kept between calls so
// that generating one more token runs that token alone through the layers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace lema::trainer {

/// One layer's keys and values, [batch, kv_heads, seen, head_dim]; undefined before the first
/// call.
struct LayerKv {
  at::Tensor keys, values;
};

struct KvCache {
  std::vector<LayerKv> layers;  // one per decoder layer, filled by the first call
  std::int64_t length = 0;      // positions cached
};

}  // namespace lema::trainer
