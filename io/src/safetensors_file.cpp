#include "detail/safetensors_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "lema/base/unique_fd.hpp"

namespace lema::io::detail {

namespace {

// "a FIFO", "a directory", ... for a mode that is not a regular file's.
const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a file";
}

[[noreturn]] void throw_not_regular(mode_t mode, const std::string& label) {
  throw CheckpointError(label, "", "unreadable",
                        std::string("is ") + file_kind(mode) +
                            ", not a regular file; give a .safetensors file or a checkpoint "
                            "directory");
}

}  // namespace

// Reads exactly `length` bytes at `offset`, retrying short reads and EINTR.
void pread_exact(int fd, char* out, std::uint64_t length, std::uint64_t offset,
                 const std::string& file, const char* purpose) {
  std::uint64_t done = 0;
  while (done < length) {
    const ssize_t n = ::pread(fd, out + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw ReadError(file, offset, length, errno, purpose);
    }
    if (n == 0) {
      throw ReadError(file, offset, length, 0,
                      "the file ended after " + std::to_string(done) +
                          " bytes; was it truncated while being opened?");
    }
    done += static_cast<std::uint64_t>(n);
  }
}

// Note [Never block on open]
// open(2) of a FIFO for reading waits for a writer, forever if none comes, and opening a device
// may have side effects. So the type is checked with stat() before anything is opened, and the
// open itself uses O_NONBLOCK followed by fstat(), in case the path was replaced in between.
// O_NONBLOCK changes nothing for reads of a regular file, and the descriptor is used only for
// pread here (the Reader opens files itself).
RegularFile open_regular_file(const std::filesystem::path& path, const std::string& label) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) throw_not_regular(st.st_mode, label);
  for (;;) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == ENOENT || err == ENOTDIR) {
        throw CheckpointError(label, "", "not-found", "no such file");
      }
      throw CheckpointError(label, "", "unreadable",
                            std::string("cannot open for reading: ") + std::strerror(err));
    }
    RegularFile file{UniqueFd(fd), 0};
    if (::fstat(fd, &st) != 0) {
      throw CheckpointError(label, "", "unreadable",
                            std::string("cannot stat: ") + std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) throw_not_regular(st.st_mode, label);
    file.size = static_cast<std::uint64_t>(st.st_size);
    return file;
  }
}

LoadedFile load_safetensors_file(const std::filesystem::path& path) {
  const std::string label = path.string();
  const RegularFile file = open_regular_file(path, label);
  const UniqueFd& fd = file.fd;
  const std::uint64_t file_size = file.size;
  constexpr const char* kPurpose = "reading the safetensors header";
  if (file_size < 8) {
    throw CheckpointError(label, "", "file-too-small",
                          "file is " + std::to_string(file_size) +
                              " bytes, shorter than the 8-byte header length of a safetensors "
                              "file");
  }

  unsigned char prefix[8];
  pread_exact(fd.get(), reinterpret_cast<char*>(prefix), 8, 0, label, kPurpose);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];  // little-endian on every host

  if (n > kMaxHeaderBytes) {
    throw CheckpointError(label, "", "header-too-large",
                          "header length field says " + std::to_string(n) +
                              " bytes, over the limit of " + std::to_string(kMaxHeaderBytes) +
                              " (not a safetensors file, or a corrupt one)");
  }
  if (n > file_size - 8) {
    throw CheckpointError(label, "", "header-out-of-bounds",
                          "header length field says " + std::to_string(n) + " bytes but only " +
                              std::to_string(file_size - 8) +
                              " bytes follow it in the file (is the file truncated?)");
  }

  std::string header(n, '\0');
  pread_exact(fd.get(), header.data(), n, 8, label, kPurpose);

  LoadedFile out;
  out.header = parse_header(header, file_size - 8 - n, label);
  out.info.path = path;
  out.info.header_bytes = 8 + n;
  out.info.file_size = file_size;
  out.info.metadata = std::move(out.header.metadata);
  return out;
}

}  // namespace lema::io::detail
