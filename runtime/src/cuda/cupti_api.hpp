// CUPTI's activity API as a function table filled at run time: dlopen of the library, dlsym of
// each entry point the unified-memory counters use. <cupti.h> is included for the types only;
// nothing links libcupti, so builds run where CUPTI is not installed and say why the counters
// are off.
//
// The library is $LEMA_CUPTI_LIBRARY when set (and only it), else "libcupti.so.13", else
// "libcupti.so". A loaded library stays loaded for the life of the process: CUPTI's thread may
// call our buffer callbacks at any time, and unloading it is never safe.
//
// Thread safety: load_cupti() may be called from any thread; a CuptiApi is immutable.
#pragma once

#include <cupti.h>

#include <string>

namespace lema::runtime::cuda {

struct CuptiApi {
  std::string library;  // as given to dlopen

  decltype(&::cuptiActivityConfigureUnifiedMemoryCounter) configure_unified_memory_counter =
      nullptr;
  decltype(&::cuptiActivityEnable) activity_enable = nullptr;
  decltype(&::cuptiActivityDisable) activity_disable = nullptr;
  decltype(&::cuptiActivityRegisterCallbacks) register_callbacks = nullptr;
  decltype(&::cuptiActivityFlushAll) flush_all = nullptr;
  decltype(&::cuptiActivityGetNextRecord) get_next_record = nullptr;
  decltype(&::cuptiGetResultString) get_result_string = nullptr;
  /// Optional: the clock of the records' timestamps (without it, records are timed when they
  /// are delivered).
  decltype(&::cuptiGetTimestamp) get_timestamp = nullptr;

  /// "CUPTI_ERROR_NOT_SUPPORTED" (the library's name for the result).
  std::string describe(CUptiResult r) const;
};

/// The table, loaded once per library name; nullptr with `reason` set when no candidate library
/// can be loaded or one lacks an entry point. Failures are not cached.
const CuptiApi* load_cupti(std::string* reason);

}  // namespace lema::runtime::cuda
