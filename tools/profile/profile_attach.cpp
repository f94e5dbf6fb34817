// The reader's side of a profile segment: attaching read-only to another process's segment and
// draining its events (the layout is read by profile_shm::SegmentView, in the runtime).
#include <algorithm>
#include <bit>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cstring>

#include "lema/base/error.hpp"
#include "profile_reader.hpp"
#include "profile_shm.hpp"

namespace lema::runtime {

namespace bip = boost::interprocess;

struct ProfileAttachment::Impl {
  bip::shared_memory_object shm;
  bip::mapped_region region;
  std::optional<profile_shm::SegmentView> view;
  std::string name;
};

ProfileAttachment::ProfileAttachment(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProfileAttachment::ProfileAttachment(ProfileAttachment&&) noexcept = default;
ProfileAttachment& ProfileAttachment::operator=(ProfileAttachment&&) noexcept = default;
ProfileAttachment::~ProfileAttachment() = default;

std::optional<ProfileAttachment> ProfileAttachment::try_attach(const std::string& name) {
  auto impl = std::make_unique<Impl>();
  impl->name = name;
  try {
    impl->shm = bip::shared_memory_object(bip::open_only, name.c_str(), bip::read_only);
    impl->region = bip::mapped_region(impl->shm, bip::read_only);
  } catch (const bip::interprocess_exception& e) {
    if (e.get_error_code() == bip::not_found_error) return std::nullopt;
    throw Error("cannot open the profile segment /dev/shm/" + name + ": " + e.what());
  }
  impl->view.emplace(static_cast<const std::byte*>(impl->region.get_address()),
                     impl->region.get_size(), name);
  return ProfileAttachment(std::move(impl));
}

ProfileAttachment ProfileAttachment::attach(const std::string& name) {
  auto a = try_attach(name);
  if (!a)
    throw Error("no profile segment /dev/shm/" + name +
                ": the process is not running, or runs without LEMA_PROFILE set (start it with "
                "LEMA_PROFILE=out.lprof or under `lema prof record`)");
  return std::move(*a);
}

const std::string& ProfileAttachment::name() const noexcept {
  return impl_->name;
}
std::uint64_t ProfileAttachment::pid() const noexcept {
  return impl_->view->header().pid;
}
std::uint64_t ProfileAttachment::recorder_pid() const noexcept {
  return impl_->view->header().recorder_pid;
}
std::uint64_t ProfileAttachment::created_ns() const noexcept {
  return impl_->view->header().created_ns;
}
bool ProfileAttachment::owner_running() const {
  const auto& h = impl_->view->header();
  return profile_shm::process_running(h.pid, h.start_ticks);
}
std::vector<ProfileSourceInfo> ProfileAttachment::sources() const {
  return impl_->view->sources();
}
std::size_t ProfileAttachment::drain(std::vector<ProfileEvent>& out, bool final) {
  return impl_->view->drain(out, final);
}
std::uint64_t ProfileAttachment::dropped() const noexcept {
  return impl_->view->dropped();
}
std::uint64_t ProfileAttachment::written() const noexcept {
  return impl_->view->header().head.load(std::memory_order_relaxed);
}

}  // namespace lema::runtime
