// What both readers share: a batch split into device-sized pieces, the statistics counters,
// the open files, and the options' validation.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "detail/batch_state.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/io/reader.hpp"

namespace lema::io::detail {

/// Logical block size assumed for O_DIRECT: offset, length and buffer are aligned to it.
inline constexpr std::uint64_t kDirectAlign = 4096;

/// A contiguous part of one ReadRequest, at most request_bytes long, read by one device request
/// (plus resubmissions of what a short read left).
struct ReadPiece {
  std::shared_ptr<BatchState> batch;
  std::uint32_t file = 0;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::byte* dest = nullptr;
  std::uint64_t done = 0;    // bytes already delivered to dest
  std::uint64_t direct = 0;  // of which read with O_DIRECT
  unsigned retries = 0;      // consecutive EAGAIN/EINTR results
};

struct SplitBatch {
  std::shared_ptr<BatchState> state;  // expects one finish_one() per piece
  std::vector<ReadPiece> pieces;
};

/// Checks the requests against the file list (throws InvalidArgument) and cuts them into pieces
/// that end on multiples of `request_bytes` in the file. With `direct_cuts`, a request whose
/// destination has the same alignment as its offset is also cut at its first and last 4096
/// boundary, so everything between can be read with O_DIRECT straight into the destination.
/// With no pieces (an empty batch, zero lengths) the state is already complete: the callback
/// has run on the calling thread.
SplitBatch split_batch(const std::vector<ReadRequest>& batch, std::size_t file_count,
                       std::uint64_t request_bytes, bool direct_cuts, BatchState::Callback on_done);

/// Throws InvalidArgument when an option is out of range.
void validate(const ReaderOptions& options);

/// open(O_RDONLY | extra_flags); throws SystemError naming the file on failure.
UniqueFd open_for_read(const std::filesystem::path& path, int extra_flags = 0);

/// ReaderStats as atomics, updated by the reader threads.
struct StatsCounters {
  std::atomic<std::uint64_t> batches{0}, requests{0}, bytes{0}, direct_bytes{0}, short_reads{0},
      retries{0}, errors{0};

  ReaderStats snapshot() const;
};

/// Consecutive EAGAIN/EINTR results after which a piece is failed instead of retried again.
inline constexpr unsigned kMaxRetries = 1000;

/// What a file was when the reader opened it. A failed read compares the file with it, so that
/// the error can blame a file that was truncated or rewritten while in use ("changed under us")
/// instead of the disk or the checkpoint's header.
struct FileStamp {
  bool known = false;  // fstat succeeded at open
  std::uint64_t size = 0;
  std::int64_t mtime_ns = 0;
};

/// fstat of `fd`; `known` is false when it fails.
FileStamp stamp_of(int fd) noexcept;

/// The ReadError detail of a failed read of `fd`, opened as `at_open`: `detail` (may be empty),
/// then whether the file changed since it was opened. A read that found the end of the file
/// (`end_of_file`) in an unchanged file says the file is shorter than its header says.
std::string read_error_detail(int fd, const FileStamp& at_open, bool end_of_file,
                              const std::string& detail);

}  // namespace lema::io::detail
