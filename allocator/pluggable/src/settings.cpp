#include "settings.hpp"

#include <cstdlib>
#include <string>

#include "lema/base/units.hpp"

namespace lema::pluggable {
namespace {

std::uint64_t size_setting(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  return parse_size(v, name);
}

}  // namespace

allocator::cuda::DeviceVmmOptions options_from_environment(int device) {
  allocator::cuda::DeviceVmmOptions o;
  o.device = device;
  o.budget_bytes = size_setting("LEMA_ALLOC_BUDGET");
  o.reserve_bytes = size_setting("LEMA_ALLOC_RESERVE");
  return o;
}

}  // namespace lema::pluggable
