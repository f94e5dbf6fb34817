// Loading CUPTI: dlopen of the first library that loads, dlsym of each entry point.
#include "cuda/cupti_api.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "cuda/driver_api.hpp"

namespace lema::runtime::cuda {
namespace {

template <typename Fn>
void resolve(void* handle, const char* symbol, Fn& out, std::string* missing) {
  out = reinterpret_cast<Fn>(::dlsym(handle, symbol));
  if (out != nullptr || missing == nullptr) return;
  if (!missing->empty()) *missing += ", ";
  *missing += symbol;
}

std::unique_ptr<CuptiApi> open_cupti(const std::string& library, std::string* reason) {
  // RTLD_NOW: a library with unresolved symbols fails here, not on first use.
  void* handle = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = ::dlerror();
    *reason = "cannot load CUPTI '" + library + "' (" + (err ? err : "dlopen failed") + ")";
    return nullptr;
  }
  auto api = std::make_unique<CuptiApi>();
  api->library = library;
  std::string missing;
  resolve(handle, "cuptiActivityConfigureUnifiedMemoryCounter",
          api->configure_unified_memory_counter, &missing);
  resolve(handle, "cuptiActivityEnable", api->activity_enable, &missing);
  resolve(handle, "cuptiActivityDisable", api->activity_disable, &missing);
  resolve(handle, "cuptiActivityRegisterCallbacks", api->register_callbacks, &missing);
  resolve(handle, "cuptiActivityFlushAll", api->flush_all, &missing);
  resolve(handle, "cuptiActivityGetNextRecord", api->get_next_record, &missing);
  resolve(handle, "cuptiGetResultString", api->get_result_string, &missing);
  resolve(handle, "cuptiGetTimestamp", api->get_timestamp, nullptr);
  if (!missing.empty()) {
    *reason = "CUPTI '" + library +
              "' lacks entry points the unified-memory counters use: " + missing +
              " (a CUPTI older than CUDA 13?)";
    ::dlclose(handle);
    return nullptr;
  }
  return api;
}

}  // namespace

const CuptiApi* load_cupti(std::string* reason) {
  static std::mutex mutex;
  // Never freed: CUPTI's thread may call the buffer callbacks, which read the table, while the
  // process exits.
  static auto* loaded = new std::map<std::string, std::unique_ptr<CuptiApi>>();

  std::vector<std::string> candidates;
  if (const char* env = std::getenv("LEMA_CUPTI_LIBRARY"); env != nullptr && *env != '\0') {
    candidates.emplace_back(env);
  } else if (const std::string driver = driver_library_name({}); driver != "libcuda.so.1") {
    // The system's CUPTI observes the system's driver only: over another driver (a fake one,
    // $LEMA_CUDA_DRIVER) it would count nothing or fail in ways that say nothing.
    if (reason != nullptr)
      *reason = "the CUDA driver in use is '" + driver +
                "' ($LEMA_CUDA_DRIVER), not the system's; name a CUPTI for it in "
                "LEMA_CUPTI_LIBRARY";
    return nullptr;
  } else {
    candidates = {"libcupti.so.13", "libcupti.so"};
  }
  std::lock_guard lock(mutex);
  std::string why;
  for (const std::string& name : candidates) {
    if (auto it = loaded->find(name); it != loaded->end()) return it->second.get();
    std::string failed;
    if (auto api = open_cupti(name, &failed))
      return loaded->emplace(name, std::move(api)).first->second.get();
    why += (why.empty() ? "" : "; ") + failed;
  }
  if (reason != nullptr) {
    *reason = why +
              "; install CUPTI (it comes with the CUDA toolkit) where the loader finds it, "
              "or name the library in LEMA_CUPTI_LIBRARY";
  }
  return nullptr;
}

std::string CuptiApi::describe(CUptiResult r) const {
  const char* text = nullptr;
  if (get_result_string == nullptr || get_result_string(r, &text) != CUPTI_SUCCESS) text = nullptr;
  return text != nullptr ? std::string(text) : "CUptiResult " + std::to_string(static_cast<int>(r));
}

}  // namespace lema::runtime::cuda
