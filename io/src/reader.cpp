// Reader::open (choice of the io path), ReadTicket, BatchState and what both readers share.
#include "lema/io/reader.hpp"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "detail/batch_state.hpp"
#include "detail/read_piece.hpp"
#include "detail/reader_impls.hpp"
#include "lema/base/error.hpp"
#include "lema/io/checkpoint.hpp"

namespace lema::io {

// ---- BatchState ----------------------------------------------------------------------------

namespace detail {

void BatchState::finish_one(std::exception_ptr error) {
  {
    std::lock_guard lock(mutex_);
    if (error && !error_) {
      error_ = std::move(error);
      failed_.store(true, std::memory_order_release);
    }
    if (--outstanding_ != 0) return;
  }
  complete();
}

void BatchState::complete() {
  if (callback_) {
    // error_ is final: every piece has reported under mutex_ before we got here.
    try {
      callback_(error_);
    } catch (const std::exception& e) {
      spdlog::error("a read completion callback threw: {}", e.what());
    } catch (...) {
      spdlog::error("a read completion callback threw a non-standard exception");
    }
    callback_ = nullptr;  // release what it captured before anyone waits on it
  }
  {
    std::lock_guard lock(mutex_);
    done_ = true;
  }
  done_cv_.notify_all();
}

void BatchState::wait() {
  std::unique_lock lock(mutex_);
  done_cv_.wait(lock, [&] { return done_; });
  if (error_) std::rethrow_exception(error_);
}

bool BatchState::ready() const {
  std::lock_guard lock(mutex_);
  return done_;
}

ReaderStats StatsCounters::snapshot() const {
  ReaderStats s;
  s.batches = batches.load(std::memory_order_relaxed);
  s.requests = requests.load(std::memory_order_relaxed);
  s.bytes = bytes.load(std::memory_order_relaxed);
  s.direct_bytes = direct_bytes.load(std::memory_order_relaxed);
  s.short_reads = short_reads.load(std::memory_order_relaxed);
  s.retries = retries.load(std::memory_order_relaxed);
  s.errors = errors.load(std::memory_order_relaxed);
  return s;
}

SplitBatch split_batch(const std::vector<ReadRequest>& batch, std::size_t file_count,
                       std::uint64_t request_bytes, bool direct_cuts,
                       BatchState::Callback on_done) {
  std::vector<ReadPiece> pieces;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const ReadRequest& r = batch[i];
    LEMA_EXPECTS(r.file < file_count, "read request " + std::to_string(i) + " names file " +
                                          std::to_string(r.file) + " but the reader has " +
                                          std::to_string(file_count) + " file(s)");
    LEMA_EXPECTS(r.length == 0 || r.dest != nullptr, "read request " + std::to_string(i) +
                                                         " has no destination for its " +
                                                         std::to_string(r.length) + " bytes");
    LEMA_EXPECTS(r.offset + r.length >= r.offset,
                 "read request " + std::to_string(i) + ": offset " + std::to_string(r.offset) +
                     " + length " + std::to_string(r.length) + " overflows");
    const std::uint64_t end = r.offset + r.length;
    // Direct cuts only help when destination and offset share their alignment.
    const bool coaligned =
        direct_cuts && (reinterpret_cast<std::uintptr_t>(r.dest) - r.offset) % kDirectAlign == 0;
    const std::uint64_t head_cut = (r.offset + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    const std::uint64_t tail_cut = end / kDirectAlign * kDirectAlign;
    std::uint64_t pos = r.offset;
    while (pos < end) {
      std::uint64_t next = std::min(end, (pos / request_bytes + 1) * request_bytes);
      if (coaligned) {
        if (pos < head_cut && head_cut < next) next = head_cut;
        if (pos < tail_cut && tail_cut < next) next = tail_cut;
      }
      pieces.push_back(ReadPiece{nullptr, r.file, pos, next - pos, r.dest + (pos - r.offset), 0});
      pos = next;
    }
  }
  auto state = std::make_shared<BatchState>(pieces.size(), std::move(on_done));
  for (auto& p : pieces) p.batch = state;
  if (pieces.empty()) state->finish_empty();
  return SplitBatch{std::move(state), std::move(pieces)};
}

void validate(const ReaderOptions& o) {
  LEMA_EXPECTS(o.request_bytes >= kDirectAlign && o.request_bytes <= (64u << 20) &&
                   o.request_bytes % kDirectAlign == 0,
               "request_bytes = " + std::to_string(o.request_bytes) +
                   " is not a multiple of 4096 between 4 KiB and 64 MiB");
  LEMA_EXPECTS(o.queue_depth >= 1 && o.queue_depth <= 1024,
               "queue_depth = " + std::to_string(o.queue_depth) + " is not within 1–1024");
  LEMA_EXPECTS(o.threads >= 1 && o.threads <= 256,
               "threads = " + std::to_string(o.threads) + " is not within 1–256");
}

UniqueFd open_for_read(const std::filesystem::path& path, int extra_flags) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | extra_flags);
  if (fd < 0) {
    const int err = errno;
    throw SystemError("cannot open " + path.string() + " for reading: " + std::strerror(err), err);
  }
  return UniqueFd(fd);
}

FileStamp stamp_of(int fd) noexcept {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return {};
  return {true, static_cast<std::uint64_t>(st.st_size),
          static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec};
}

std::string read_error_detail(int fd, const FileStamp& at_open, bool end_of_file,
                              const std::string& detail) {
  const FileStamp now = stamp_of(fd);
  std::string out = detail;
  auto add = [&out](const std::string& part) { out += (out.empty() ? "" : "; ") + part; };
  if (at_open.known && now.known &&
      (now.size != at_open.size || now.mtime_ns != at_open.mtime_ns)) {
    add("the file changed under us: it was " + std::to_string(at_open.size) +
        " bytes when opened and is now " + std::to_string(now.size) + " bytes" +
        (now.mtime_ns != at_open.mtime_ns ? ", modified since" : "") +
        "; it was truncated or rewritten while in use: let whatever writes it finish, then "
        "start again");
  } else if (end_of_file) {
    add("the file is " + (now.known ? std::to_string(now.size) + " bytes, " : std::string()) +
        "shorter than its header says; was it truncated or replaced after it was opened?");
  }
  return out;
}

}  // namespace detail

// ---- ReadTicket ----------------------------------------------------------------------------

void ReadTicket::wait() const {
  if (state_) state_->wait();
}

bool ReadTicket::ready() const {
  return !state_ || state_->ready();
}

// ---- Reader::open --------------------------------------------------------------------------

namespace {

// The kind asked for: options first, then LEMA_IO when the options leave it automatic.
IoKind requested_kind(IoKind kind) {
  if (kind != IoKind::automatic) return kind;
  const char* env = std::getenv("LEMA_IO");
  if (env == nullptr || *env == '\0') return IoKind::automatic;
  const std::string_view v(env);
  if (v == "uring") return IoKind::uring;
  if (v == "pread") return IoKind::pread;
  throw InvalidArgument("LEMA_IO='" + std::string(v) +
                        "' is not a valid io path; set LEMA_IO=uring or LEMA_IO=pread, or unset "
                        "it to let the reader choose");
}

// Info on the first reader of the process, debug afterwards: tests and tools open many readers.
spdlog::level::level_enum once_level(std::atomic<bool>& logged) {
  return logged.exchange(true) ? spdlog::level::debug : spdlog::level::info;
}

std::atomic<bool> g_path_logged{false};
std::atomic<bool> g_fallback_logged{false};

}  // namespace

std::unique_ptr<Reader> Reader::open(std::vector<std::filesystem::path> files,
                                     ReaderOptions options) {
  detail::validate(options);
  const IoKind kind = requested_kind(options.kind);
  std::unique_ptr<Reader> reader;
  if (kind != IoKind::pread) {
    std::string why;
    reader = detail::make_uring_reader(files, options, why);
    if (!reader) {
      if (kind == IoKind::uring) {
        throw InvalidArgument(
            "the io_uring reader was asked for (LEMA_IO=uring or "
            "ReaderOptions::kind) but cannot be used: " +
            why + "; use LEMA_IO=pread");
      }
      spdlog::log(once_level(g_fallback_logged),
                  "io_uring is not available ({}); reading with pread", why);
    }
  }
  if (!reader) reader = detail::make_pread_reader(std::move(files), options);
  spdlog::log(once_level(g_path_logged), "checkpoint reads use {}", reader->path_name());
  return reader;
}

std::unique_ptr<Reader> Reader::open(const Checkpoint& checkpoint, ReaderOptions options) {
  std::vector<std::filesystem::path> files;
  files.reserve(checkpoint.files().size());
  for (const FileInfo& f : checkpoint.files()) files.push_back(f.path);
  return open(std::move(files), std::move(options));
}

}  // namespace lema::io

namespace lema::io {

std::vector<ReadRequest> Reader::read_cached(std::vector<ReadRequest> batch) {
  if (nowait_refused_.load(std::memory_order_relaxed)) return batch;
  std::vector<ReadRequest> rest;
  std::uint64_t delivered = 0;
  for (std::size_t i = 0; i < batch.size(); ++i) {
    ReadRequest r = batch[i];
    const int fd = cached_read_fd(r.file);
    while (fd >= 0 && r.length > 0) {
      iovec iov{r.dest, static_cast<std::size_t>(std::min<std::uint64_t>(r.length, 1u << 30))};
      const ssize_t n = ::preadv2(fd, &iov, 1, static_cast<off_t>(r.offset), RWF_NOWAIT);
      if (n > 0) {
        r.offset += static_cast<std::uint64_t>(n);
        r.dest += n;
        r.length -= static_cast<std::uint64_t>(n);
        delivered += static_cast<std::uint64_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      // EOF, EAGAIN (not cached) or an error: submit() reads (or reports) the rest.
      if (n < 0 && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
        nowait_refused_.store(true, std::memory_order_relaxed);
        spdlog::debug(
            "reader: preadv2(RWF_NOWAIT) refused ({}); cached reads go through the "
            "reader's threads",
            std::strerror(errno));
      }
      break;
    }
    if (r.length > 0) rest.push_back(r);
  }
  cached_bytes_.fetch_add(delivered, std::memory_order_relaxed);
  return rest;
}

}  // namespace lema::io
