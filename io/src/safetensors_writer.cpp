#include "lema/io/safetensors_writer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>

#include "lema/base/error.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/base/units.hpp"

namespace lema::io {

namespace {

// Tensor bytes are produced into a buffer of this size and written in one call, so writing a
// model of any size holds at most this much beside the caller's own state.
constexpr std::size_t kWriteBufferBytes = 8 << 20;

[[noreturn]] void throw_errno(const std::string& what, const std::filesystem::path& path, int err) {
  throw SystemError(what + " '" + path.string() + "': " + std::strerror(err), err);
}

void write_all(int fd, const std::byte* data, std::size_t size, const std::filesystem::path& path) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write", path, errno);
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

void fsync_directory(const std::filesystem::path& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) throw_errno("cannot open directory", dir, errno);
  // Some file systems refuse fsync on a directory; the rename itself has still happened.
  if (::fsync(fd.get()) != 0 && errno != EINVAL && errno != ENOTSUP) {
    throw_errno("cannot fsync directory", dir, errno);
  }
}

// Note [Atomic replace]
// A file is written under a temporary name in the target's directory (same file system, so the
// rename is atomic), flushed with fsync, renamed over the target, and the directory is fsynced
// so the rename survives a crash. Until commit() the target is untouched; an owner destroyed
// without commit() removes the temporary file.
class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path target) : target_(std::move(target)) {
    static std::atomic<unsigned> counter{0};
    const auto dir = directory();
    for (int attempt = 0;; ++attempt) {
      // The pattern is_temporary_of() recognises.
      temp_ = dir / ("." + target_.filename().string() + ".tmp-" + std::to_string(::getpid()) +
                     "-" + std::to_string(counter.fetch_add(1)));
      fd_.reset(::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
      if (fd_) break;
      if (errno != EEXIST || attempt > 100) {
        throw_errno("cannot create a temporary file beside", target_, errno);
      }
    }
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  AtomicFile(AtomicFile&&) = delete;
  AtomicFile& operator=(AtomicFile&&) = delete;
  ~AtomicFile() {
    if (!committed_) {
      fd_.reset();
      ::unlink(temp_.c_str());
    }
  }

  int fd() const noexcept { return fd_.get(); }
  const std::filesystem::path& temp_path() const noexcept { return temp_; }

  void commit() {
    if (::fsync(fd_.get()) != 0) throw_errno("cannot fsync", temp_, errno);
    if (::close(fd_.release()) != 0) throw_errno("cannot close", temp_, errno);
    if (::rename(temp_.c_str(), target_.c_str()) != 0)
      throw_errno("cannot rename onto", target_, errno);
    committed_ = true;
    fsync_directory(directory());
  }

 private:
  std::filesystem::path directory() const {
    auto dir = target_.parent_path();
    return dir.empty() ? std::filesystem::path(".") : dir;
  }

  std::filesystem::path target_;
  std::filesystem::path temp_;
  UniqueFd fd_;
  bool committed_ = false;
};

struct PlacedTensor {
  TensorToWrite* tensor;
  std::uint64_t nbytes;
  std::uint64_t begin;
};

// The header exactly as the reference writer serializes it: compact JSON, `__metadata__` first,
// tensors in data order, padded with spaces to a multiple of 8 bytes.
std::string header_json(const std::vector<PlacedTensor>& placed,
                        const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& meta = header["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
  }
  for (const auto& p : placed) {
    nlohmann::ordered_json info = nlohmann::ordered_json::object();
    info["dtype"] = std::string(dtype_name(p.tensor->dtype));
    info["shape"] = p.tensor->shape;
    info["data_offsets"] = {p.begin, p.begin + p.nbytes};
    header[p.tensor->name] = std::move(info);
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(std::string("cannot encode the safetensors header: a tensor name or a "
                                      "metadata entry is not valid UTF-8 (") +
                          e.what() + ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

std::vector<PlacedTensor> place(std::vector<TensorToWrite>& tensors,
                                const std::filesystem::path& path) {
  std::vector<PlacedTensor> placed;
  placed.reserve(tensors.size());
  std::set<std::string_view> names;
  for (auto& t : tensors) {
    if (t.name == "__metadata__") {
      throw InvalidArgument("cannot write '" + path.string() +
                            "': '__metadata__' is reserved and cannot name a tensor");
    }
    if (!names.insert(t.name).second) {
      throw InvalidArgument("cannot write '" + path.string() + "': tensor '" + t.name +
                            "' is given twice");
    }
    if (!t.fill) {
      throw InvalidArgument("cannot write '" + path.string() + "': tensor '" + t.name +
                            "' has no fill function");
    }
    placed.push_back({&t, tensor_nbytes(t.dtype, t.shape), 0});
  }
  // The reference order: descending dtype (its enum is in increasing alignment), then name.
  std::sort(placed.begin(), placed.end(), [](const PlacedTensor& a, const PlacedTensor& b) {
    if (a.tensor->dtype != b.tensor->dtype) return a.tensor->dtype > b.tensor->dtype;
    return a.tensor->name < b.tensor->name;
  });
  std::uint64_t offset = 0;
  for (auto& p : placed) {
    p.begin = offset;
    if (__builtin_add_overflow(offset, p.nbytes, &offset)) {
      throw InvalidArgument("cannot write '" + path.string() + "': total size overflows");
    }
  }
  return placed;
}

}  // namespace

std::uint64_t tensor_nbytes(Dtype dtype, std::span<const std::int64_t> shape) {
  std::uint64_t numel = 1;
  for (auto dim : shape) {
    if (dim < 0) {
      throw InvalidArgument("tensor dimension " + std::to_string(dim) + " is negative");
    }
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(dim), &numel)) {
      throw InvalidArgument("tensor element count overflows 64 bits");
    }
  }
  std::uint64_t bits = 0;
  if (__builtin_mul_overflow(numel, std::uint64_t{dtype_bits(dtype)}, &bits)) {
    throw InvalidArgument("tensor byte size overflows 64 bits");
  }
  if (bits % 8 != 0) {
    throw InvalidArgument(std::to_string(numel) + " elements of " + std::string(dtype_name(dtype)) +
                          " (" + std::to_string(dtype_bits(dtype)) +
                          " bits each) do not fill whole bytes");
  }
  return bits / 8;
}

void write_safetensors(const std::filesystem::path& path, std::vector<TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata) {
  const auto placed = place(tensors, path);
  const std::string header = header_json(placed, metadata);

  AtomicFile file(path);
  std::byte length[8];
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) length[i] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  write_all(file.fd(), length, sizeof length, file.temp_path());
  write_all(file.fd(), reinterpret_cast<const std::byte*>(header.data()), header.size(),
            file.temp_path());

  std::vector<std::byte> buffer(kWriteBufferBytes);
  std::size_t used = 0;
  for (const auto& p : placed) {
    std::uint64_t done = 0;
    while (done < p.nbytes) {
      const std::size_t piece =
          static_cast<std::size_t>(std::min<std::uint64_t>(p.nbytes - done, buffer.size() - used));
      p.tensor->fill(std::span<std::byte>(buffer.data() + used, piece), done);
      used += piece;
      done += piece;
      if (used == buffer.size()) {
        write_all(file.fd(), buffer.data(), used, file.temp_path());
        used = 0;
      }
    }
  }
  write_all(file.fd(), buffer.data(), used, file.temp_path());
  file.commit();
}

bool is_temporary_of(std::string_view name, std::string_view target) {
  // ".<target>.tmp-<digits>-<digits>", nothing more and nothing less.
  const std::string prefix = "." + std::string(target) + ".tmp-";
  if (!name.starts_with(prefix)) return false;
  const std::string_view rest = name.substr(prefix.size());
  const auto dash = rest.find('-');
  auto digits = [](std::string_view s) {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  return dash != std::string_view::npos && digits(rest.substr(0, dash)) &&
         digits(rest.substr(dash + 1));
}

void write_file_atomically(const std::filesystem::path& path, std::string_view contents) {
  AtomicFile file(path);
  write_all(file.fd(), reinterpret_cast<const std::byte*>(contents.data()), contents.size(),
            file.temp_path());
  file.commit();
}

}  // namespace lema::io
