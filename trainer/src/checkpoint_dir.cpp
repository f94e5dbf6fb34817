// Publishing checkpoint directories atomically (Note [Checkpoint publication] in
// train_state.hpp) and finding the newest complete one.
#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/io/safetensors_writer.hpp"
#include "lema/trainer/train_state.hpp"

namespace lema::trainer {

namespace {

constexpr std::string_view kPartialPrefix = ".partial-";
constexpr std::string_view kCheckpointPrefix = "checkpoint-";

void fsync_path(const std::filesystem::path& path, bool directory) {
  UniqueFd fd(LEMA_SYS_TRY(
      ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC)));
  LEMA_SYS_TRY(::fsync(fd.get()));
}

std::optional<std::int64_t> checkpoint_step(const std::string& name) {
  if (!name.starts_with(kCheckpointPrefix)) return std::nullopt;
  const std::string_view digits = std::string_view(name).substr(kCheckpointPrefix.size());
  std::int64_t step = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (ec != std::errc() || end != digits.data() + digits.size() || digits.empty()) {
    return std::nullopt;
  }
  return step;
}

bool is_complete(const std::filesystem::path& dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(dir / kTrainStateFile, ec);
}

bool is_number(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// "<rest>-<pid>" where `rest` passes `head`.
template <typename Head>
bool with_pid(std::string_view s, Head head) {
  const auto dash = s.rfind('-');
  return dash != std::string_view::npos && is_number(s.substr(dash + 1)) && head(s.substr(0, dash));
}

// The names publish_checkpoint and prepare_output_dir give their temporaries, exactly:
// .partial-checkpoint-<N>-<pid>, .partial-old-checkpoint-<N>-<pid>, .partial-probe-<pid>.
bool is_partial(std::string_view name) {
  if (!name.starts_with(kPartialPrefix)) return false;
  name.remove_prefix(kPartialPrefix.size());
  auto is_checkpoint = [](std::string_view head) {
    return head.starts_with(kCheckpointPrefix) && is_number(head.substr(kCheckpointPrefix.size()));
  };
  if (name.starts_with("old-")) return with_pid(name.substr(4), is_checkpoint);
  return with_pid(name, [&](std::string_view head) { return head == "probe" || is_checkpoint(head); });
}

// Temporaries of earlier, interrupted saves: never complete, never read.
void remove_partials(const std::filesystem::path& out_dir) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(out_dir, ec)) {
    if (is_partial(entry.path().filename().string())) {
      std::filesystem::remove_all(entry.path(), ec);
    }
  }
}

}  // namespace

std::vector<std::filesystem::path> remove_interrupted_saves(const std::filesystem::path& out_dir) {
  // Files written atomically straight into out_dir (Note [Atomic replace] in the io writer).
  static constexpr std::array<std::string_view, 3> kAtomicTargets = {
      kLatestFile, kAdapterWeightsFile, kAdapterConfigFile};
  std::vector<std::filesystem::path> removed;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(out_dir, ec)) {
    const std::string name = entry.path().filename().string();
    const bool ours = is_partial(name) || std::any_of(kAtomicTargets.begin(), kAtomicTargets.end(),
                                                      [&](std::string_view target) {
                                                        return io::is_temporary_of(name, target);
                                                      });
    std::error_code remove_ec;
    if (ours && std::filesystem::remove_all(entry.path(), remove_ec) > 0) {
      removed.push_back(entry.path());
    }
  }
  return removed;
}

std::string checkpoint_name(std::int64_t step) {
  return std::string(kCheckpointPrefix) + std::to_string(step);
}

void prepare_output_dir(const std::filesystem::path& out_dir) {
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    throw InvalidArgument("cannot create output directory " + out_dir.string() + ": " +
                          ec.message() + "; choose another --out");
  }
  const auto probe =
      out_dir / (std::string(kPartialPrefix) + "probe-" + std::to_string(::getpid()));
  UniqueFd fd(::open(probe.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) {
    const int err = errno;
    throw InvalidArgument("output directory " + out_dir.string() +
                          " is not writable: " + std::strerror(err) + "; choose another --out");
  }
  fd.reset();
  ::unlink(probe.c_str());
}

std::filesystem::path publish_checkpoint(
    const std::filesystem::path& out_dir, const std::string& name,
    const std::function<void(const std::filesystem::path& dir)>& write_files) {
  remove_partials(out_dir);
  const auto final_dir = out_dir / name;
  const auto temp_dir =
      out_dir / (std::string(kPartialPrefix) + name + "-" + std::to_string(::getpid()));
  std::filesystem::create_directories(temp_dir);
  write_files(temp_dir);
  // The writers sync their own files; syncing again here covers any that do not.
  for (const auto& entry : std::filesystem::directory_iterator(temp_dir)) {
    if (entry.is_regular_file()) fsync_path(entry.path(), /*directory=*/false);
  }
  fsync_path(temp_dir, /*directory=*/true);

  if (std::filesystem::exists(final_dir)) {
    // Swap in one step, so a complete `name` exists at every moment; the old one leaves as a
    // partial and is removed.
    if (::renameat2(AT_FDCWD, temp_dir.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) ==
        0) {
      fsync_path(out_dir, /*directory=*/true);
      std::filesystem::remove_all(temp_dir);
    } else {
      const auto old_dir = out_dir / (std::string(kPartialPrefix) + "old-" + name + "-" +
                                      std::to_string(::getpid()));
      LEMA_SYS_TRY(::rename(final_dir.c_str(), old_dir.c_str()));
      LEMA_SYS_TRY(::rename(temp_dir.c_str(), final_dir.c_str()));
      fsync_path(out_dir, /*directory=*/true);
      std::filesystem::remove_all(old_dir);
    }
  } else {
    LEMA_SYS_TRY(::rename(temp_dir.c_str(), final_dir.c_str()));
    fsync_path(out_dir, /*directory=*/true);
  }
  io::write_file_atomically(out_dir / kLatestFile, name + "\n");
  return final_dir;
}

std::optional<std::filesystem::path> find_latest_checkpoint(const std::filesystem::path& out_dir) {
  std::error_code ec;
  {
    std::ifstream in(out_dir / kLatestFile);
    std::string name;
    if (in && std::getline(in, name) && checkpoint_step(name) && is_complete(out_dir / name)) {
      return out_dir / name;
    }
  }
  // No usable pointer (never written, or removed): the highest-numbered complete checkpoint.
  std::optional<std::pair<std::int64_t, std::filesystem::path>> best;
  for (const auto& entry : std::filesystem::directory_iterator(out_dir, ec)) {
    const auto step = checkpoint_step(entry.path().filename().string());
    if (step && is_complete(entry.path()) && (!best || *step > best->first)) {
      best = {*step, entry.path()};
    }
  }
  if (!best) return std::nullopt;
  return best->second;
}

}  // namespace lema::trainer
