// Policy selection by name.
#include <string>

#include "lema/base/error.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {

std::optional<PolicyKind> parse_policy(std::string_view name) {
  if (name == "lru") return PolicyKind::lru;
  if (name == "trace") return PolicyKind::trace;
  return std::nullopt;
}

std::unique_ptr<EvictionPolicy> make_policy(PolicyKind kind, std::size_t page_count) {
  switch (kind) {
    case PolicyKind::lru:
      return make_lru_policy(page_count);
    case PolicyKind::trace:
      return make_trace_policy(page_count);
  }
  throw InvalidArgument("unknown eviction policy " + std::to_string(static_cast<int>(kind)) +
                        "; use lru or trace");
}

}  // namespace lema::runtime
