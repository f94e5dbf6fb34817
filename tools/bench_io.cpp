// `lema bench`, and its `io` command: sequential read throughput of one file through every read
// path LEMA has (io_uring with O_DIRECT, io_uring buffered, pread threads) and mmap+memcpy, each
// from a cold and a warm page cache, against fio measured in the same run.
//
// Other `bench` commands live in their own files and are registered from register_bench().
#include <fcntl.h>
#include <fmt/core.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/memory_mapping.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/base/units.hpp"
#include "lema/io/reader.hpp"

namespace lema::tools {

void register_bench_io(CLI::App& bench);

void register_bench(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Measure LEMA's data paths against baselines");
  bench->require_subcommand(1);
  register_bench_io(*bench);
  register_bench_pager(*bench);
  register_bench_fallback(*bench);
}

namespace {

namespace fs = std::filesystem;

struct BenchIoArgs {
  std::string file;
  std::string block_size = "2MiB";
  unsigned queue_depth = 8;
  unsigned runs = 5;
  unsigned threads = 4;
  std::string json;
};

/// Page-aligned destination memory, touched once so that page faults are not timed.
MemoryMapping make_destination(std::uint64_t bytes) {
  MemoryMapping m = MemoryMapping::anonymous(align_up(std::max<std::uint64_t>(bytes, 1), 2_MiB),
                                             "the file's bytes (use a smaller file)");
  std::memset(m.data(), 0, m.size());
  return m;
}

/// How the page cache is emptied before a cold run.
class CacheDropper {
 public:
  explicit CacheDropper(fs::path file) : file_(std::move(file)) {
    // drop_caches empties the whole page cache; only root may, and containers often forbid it.
    drop_caches_ = ::geteuid() == 0 && write_drop_caches();
  }
  std::string method() const {
    return drop_caches_ ? "posix_fadvise(DONTNEED) + /proc/sys/vm/drop_caches"
                        : "posix_fadvise(DONTNEED)";
  }
  void drop() const {
    UniqueFd fd(LEMA_SYS_TRY(::open(file_.c_str(), O_RDONLY | O_CLOEXEC)));
    ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
    if (drop_caches_) write_drop_caches();
  }

 private:
  static bool write_drop_caches() {
    ::sync();
    std::ofstream out("/proc/sys/vm/drop_caches");
    out << "1\n";
    out.flush();
    return out.good();
  }
  fs::path file_;
  bool drop_caches_ = false;
};

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double mb_per_s(std::uint64_t bytes, double seconds) {
  return bytes / seconds / 1e6;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/// One measured path: a name, whether it runs cold or warm, and the measured speeds.
struct Series {
  std::string name;
  bool cold;
  std::function<double()> measure;  // reads the whole file once; returns MB/s
  std::vector<double> mb_s;
  std::string note;
  bool baseline = false;  // fio
};

std::optional<std::string> find_on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (!path) return std::nullopt;
  std::string dirs = path;
  std::size_t start = 0;
  while (start <= dirs.size()) {
    std::size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    const fs::path candidate = fs::path(dirs.substr(start, end - start)) / program;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
    start = end + 1;
  }
  return std::nullopt;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// Runs fio once; returns its read bandwidth in MB/s.
double run_fio(const std::string& fio, const BenchIoArgs& a, std::uint64_t block) {
  const std::string cmd = fmt::format(
      "{} --name=lema_bench_io --filename={} --readonly --ioengine=io_uring --direct=1 --rw=read "
      "--bs={} --iodepth={} --output-format=json 2>&1",
      shell_quote(fio), shell_quote(a.file), block, a.queue_depth);
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen(cmd.c_str(), "r"), ::pclose);
  if (!pipe) throw SystemError("cannot run fio: " + std::string(std::strerror(errno)), errno);
  std::string output;
  char buf[4096];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, pipe.get())) output.append(buf, n);
  const int status = ::pclose(pipe.release());
  const std::size_t brace = output.find('{');
  if (status != 0 || brace == std::string::npos) {
    throw Error("fio failed (exit status " + std::to_string(status) +
                "): " + output.substr(0, 2000));
  }
  const auto json = nlohmann::json::parse(output.substr(brace));
  const double bw = json.at("jobs").at(0).at("read").at("bw_bytes").get<double>();
  return bw / 1e6;
}

std::uint32_t crc_of(const std::byte* data, std::uint64_t size) {
  uLong crc = crc32(0L, Z_NULL, 0);
  for (std::uint64_t off = 0; off < size;) {
    const auto n = static_cast<uInt>(std::min<std::uint64_t>(size - off, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data + off), n);
    off += n;
  }
  return static_cast<std::uint32_t>(crc);
}

void bench_io(const BenchIoArgs& a) {
  const fs::path file = a.file;
  const std::uint64_t size = fs::file_size(file);
  LEMA_EXPECTS(size > 0, file.string() + " is empty; give a file to read (e.g. 1 GiB)");
  const std::uint64_t block = parse_size(a.block_size, "--block-size");
  LEMA_EXPECTS(a.runs >= 1, "--runs must be at least 1");

  const MemoryMapping dest = make_destination(size);
  const CacheDropper dropper(file);
  const std::vector<io::ReadRequest> whole{{0, 0, size, dest.data()}};

  auto open_reader = [&](io::IoKind kind, bool direct) {
    io::ReaderOptions o;
    o.kind = kind;
    o.direct = direct;
    o.queue_depth = a.queue_depth;
    o.request_bytes = block;
    o.threads = a.threads;
    return io::Reader::open({file}, o);
  };

  auto timed = [size](std::function<void()> run) {
    return [size, run = std::move(run)] {
      const auto start = Clock::now();
      run();
      return mb_per_s(size, seconds_since(start));
    };
  };

  std::vector<Series> series;
  std::vector<std::shared_ptr<io::Reader>> readers;  // opened once, outside the timings
  auto add_reader = [&](const std::string& label, io::IoKind kind, bool direct, bool cold) {
    std::shared_ptr<io::Reader> r;
    try {
      r = open_reader(kind, direct);
    } catch (const Error& e) {
      fmt::print(stderr, "{}: not measured: {}\n", label, e.what());
      return;
    }
    readers.push_back(r);
    series.push_back({label, cold, timed([r, &whole] { r->read(whole); }), {}, r->path_name()});
  };
  auto mmap_copy = [&] {
    UniqueFd fd(LEMA_SYS_TRY(::open(file.c_str(), O_RDONLY | O_CLOEXEC)));
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
    if (p == MAP_FAILED) throw SystemError("mmap of " + file.string() + " failed", errno);
    ::madvise(p, size, MADV_SEQUENTIAL);
    std::memcpy(dest.data(), p, size);
    ::munmap(p, size);
  };

  const std::optional<std::string> fio = find_on_path("fio");
  const std::string fio_note = fio ? *fio : "fio not found on PATH: install it to get the baseline";
  if (fio) {
    series.push_back({"fio io_uring O_DIRECT",
                      true,
                      [&] { return run_fio(*fio, a, block); },
                      {},
                      "baseline",
                      true});
  }
  add_reader("io_uring O_DIRECT", io::IoKind::uring, true, true);
  for (bool cold : {true, false}) {
    add_reader("io_uring buffered", io::IoKind::uring, false, cold);
    add_reader(fmt::format("pread ({} threads)", a.threads), io::IoKind::pread, false, cold);
    series.push_back({"mmap+memcpy", cold, timed(mmap_copy), {}, "1 thread"});
  }

  // Rounds interleave the paths, and each round starts at another one, so that drift in the
  // device, and whatever the host below caches, favour none of them.
  std::optional<std::uint32_t> reference_crc;
  std::vector<std::string> crc_mismatch;
  for (unsigned round = 0; round < a.runs; ++round) {
    for (bool cold : {true, false}) {
      std::vector<Series*> order;
      for (Series& s : series)
        if (s.cold == cold) order.push_back(&s);
      if (order.empty()) continue;
      std::rotate(order.begin(), order.begin() + round % order.size(), order.end());
      if (!cold) {
        // Populate the page cache for the warm runs.
        UniqueFd fd(LEMA_SYS_TRY(::open(file.c_str(), O_RDONLY | O_CLOEXEC)));
        ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_WILLNEED);
        mmap_copy();
      }
      for (Series* s : order) {
        if (cold) dropper.drop();
        if (round == 0) std::memset(dest.data(), 0, size);
        s->mb_s.push_back(s->measure());
        if (round == 0 && !s->baseline) {  // every path must deliver the same bytes
          const std::uint32_t crc = crc_of(dest.data(), size);
          if (!reference_crc)
            reference_crc = crc;
          else if (crc != *reference_crc)
            crc_mismatch.push_back(s->name);
        }
      }
    }
  }

  double fio_median = 0;
  for (const Series& s : series)
    if (s.baseline) fio_median = median(s.mb_s);
  fmt::print("file {} ({}), block size {}, queue depth {}, {} runs (median), cold cache: {}\n",
             file.string(), format_size(size), format_size(block), a.queue_depth, a.runs,
             dropper.method());
  fmt::print("{:<22} {:<5} {:>12} {:>8}  {}\n", "path", "cache", "MB/s", "x fio", "notes");
  auto row = [&](const std::string& name, const char* cache, double mbs, const std::string& note) {
    const std::string ratio = fio_median > 0 ? fmt::format("{:.2f}", mbs / fio_median) : "-";
    fmt::print("{:<22} {:<5} {:>12.0f} {:>8}  {}\n", name, cache, mbs, ratio, note);
  };
  if (!fio) {
    fmt::print("{:<22} {:<5} {:>12} {:>8}  {}\n", "fio io_uring O_DIRECT", "cold", "-", "-",
               fio_note);
  }
  for (const Series& s : series) row(s.name, s.cold ? "cold" : "warm", median(s.mb_s), s.note);
  fmt::print("MB/s = 10^6 bytes/s. ");
  if (crc_mismatch.empty()) {
    fmt::print("All paths read identical bytes (crc32 {:08x}).\n", reference_crc.value_or(0));
  } else {
    std::string names;
    for (const auto& n : crc_mismatch) names += (names.empty() ? "" : ", ") + n;
    throw Error("the bytes read differ between paths (" + names + " disagree with the first)");
  }

  if (!a.json.empty()) {
    nlohmann::json j;
    j["file"] = file.string();
    j["bytes"] = size;
    j["block_size"] = block;
    j["queue_depth"] = a.queue_depth;
    j["pread_threads"] = a.threads;
    j["runs"] = a.runs;
    j["cold_cache_method"] = dropper.method();
    j["unit"] = "MB/s (10^6 bytes per second)";
    j["fio"] = fio ? nlohmann::json{{"path", *fio}, {"median", fio_median}}
                   : nlohmann::json{{"missing", fio_note}};
    for (const Series& s : series) {
      const double m = median(s.mb_s);
      j["results"].push_back({{"name", s.name},
                              {"cache", s.cold ? "cold" : "warm"},
                              {"io_path", s.note},
                              {"mb_per_s", s.mb_s},
                              {"median", m},
                              {"ratio_to_fio", fio_median > 0 ? nlohmann::json(m / fio_median)
                                                              : nlohmann::json(nullptr)}});
    }
    std::ofstream out(a.json);
    out << j.dump(2) << "\n";
    if (!out.good()) throw Error("cannot write " + a.json);
  }
}

}  // namespace

void register_bench_io(CLI::App& bench) {
  auto args = std::make_shared<BenchIoArgs>();
  CLI::App* io = bench.add_subcommand(
      "io",
      "Sequential read throughput of FILE through each read path, cold and warm, against fio");
  io->add_option("FILE", args->file, "File to read (e.g. 1 GiB on the disk that holds checkpoints)")
      ->required()
      ->check(CLI::ExistingFile);
  io->add_option("--block-size", args->block_size, "Request size (fio --bs)")
      ->capture_default_str();
  io->add_option("--queue-depth", args->queue_depth, "Requests in flight (fio --iodepth)")
      ->capture_default_str();
  io->add_option("--runs", args->runs, "Repetitions; the table shows medians")
      ->capture_default_str();
  io->add_option("--threads", args->threads, "pread threads")->capture_default_str();
  io->add_option("--json", args->json, "Write the raw numbers to this file");
  io->callback([args] { bench_io(*args); });
}

}  // namespace lema::tools
