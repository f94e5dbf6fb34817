// Passes of the Pager over a checkpoint on the cuda backend, with and without the host cache
// tier: the first pass reads the files, later passes with the tier only cross PCIe.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>

namespace lema::bench {

/// Writes a checkpoint of about `model_bytes` into `scratch` (removed afterwards) and runs
/// `passes` passes in layer order under a budget of a quarter of it, first without then with a
/// host cache of the whole model. Returns the per-pass times, bandwidths and counters.
nlohmann::json measure_pager_passes(const std::filesystem::path& scratch,
                                    std::uint64_t model_bytes, int passes);

}  // namespace lema::bench
