// Giving up ownership of memory on purpose, where freeing it could be wrong.
//
// Note [Deliberate leaks]
// ~~~~~~~~~~~~~~~~~~~~~~~
// Memory a device may still read is never freed (Note [Device errors without a caller] in
// runtime/src/pager.cpp): a staging buffer whose copy was not seen to finish, a pool a kernel may
// still read at teardown. Those objects are released here rather than with a bare `release()`, so
// that LeakSanitizer is told the leak is meant (the object and what it reaches are ignored) and the
// leak check goes on finding the accidental ones.
#pragma once

#include <memory>

#if defined(__SANITIZE_ADDRESS__)
#define LEMA_HAS_LSAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(leak_sanitizer)
#define LEMA_HAS_LSAN 1
#endif
#endif

#if defined(LEMA_HAS_LSAN)
#include <sanitizer/lsan_interface.h>
#endif

namespace lema {

/// Releases `owner` without destroying what it holds, and tells LeakSanitizer so.
template <class T, class D>
void leak_deliberately(std::unique_ptr<T, D>& owner) noexcept {
  T* raw = owner.release();
#if defined(LEMA_HAS_LSAN)
  if (raw != nullptr) __lsan_ignore_object(raw);
#else
  (void)raw;
#endif
}

}  // namespace lema
