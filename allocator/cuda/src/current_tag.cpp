#include <string>
#include <string_view>

#include "lema/allocator/cuda/device_vmm_resource.hpp"

namespace lema::allocator::cuda {
namespace {
// Per thread: PyTorch allocates on the thread that runs the Python code which set the tag.
thread_local std::string t_current_tag;
}  // namespace

std::string_view current_tag() noexcept {
  return t_current_tag;
}

void set_current_tag(std::string_view tag) {
  t_current_tag.assign(tag);
}

}  // namespace lema::allocator::cuda
