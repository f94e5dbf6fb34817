// The profiler's reading side: attaching read-only to a process's profile segment (see
// lema/runtime/profile.hpp for the segment) and draining its events, as `lema prof record` and
// `lema prof top` do. Only tools read profiles, so this lives with them (library lema_prof), not
// in the runtime; it knows the segment's private layout (runtime/src/profile_shm.hpp), whose
// version it checks.
//
// Thread safety: a ProfileAttachment is used by one thread at a time (drain() keeps its read
// position).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lema/runtime/profile.hpp"

namespace lema::runtime {

/// A read-only view of another (or this) process's segment. Never writes to it.
class ProfileAttachment {
 public:
  /// Throws lema::Error naming the segment: absent ("no profile segment ..."), not a profile
  /// segment, or of another version.
  static ProfileAttachment attach(const std::string& name);
  /// nullopt when no segment has that name; throws like attach() for a bad one.
  static std::optional<ProfileAttachment> try_attach(const std::string& name);

  ProfileAttachment(ProfileAttachment&&) noexcept;
  ProfileAttachment& operator=(ProfileAttachment&&) noexcept;
  ~ProfileAttachment();

  const std::string& name() const noexcept;
  std::uint64_t pid() const noexcept;
  std::uint64_t recorder_pid() const noexcept;
  std::uint64_t created_ns() const noexcept;
  /// Whether the process that made the segment still runs (by pid and start time).
  bool owner_running() const;
  /// The publishers so far, with their current counters.
  std::vector<ProfileSourceInfo> sources() const;
  /// Appends the complete events written since the last drain, oldest first. Events the writer
  /// overwrote before they were read are counted in dropped(). `final`: the writers are gone;
  /// events left half-written count as dropped instead of being waited for.
  std::size_t drain(std::vector<ProfileEvent>& out, bool final = false);
  std::uint64_t dropped() const noexcept;
  /// Events ever written into the segment.
  std::uint64_t written() const noexcept;

  struct Impl;

 private:
  explicit ProfileAttachment(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lema::runtime
