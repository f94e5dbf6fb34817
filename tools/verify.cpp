// `lema verify`: streams every tensor of a checkpoint through the address space under a budget
// and prints each tensor's CRC32 (zlib's), with the pager's counters.
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/io/errors.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "lema/runtime/pager.hpp"

namespace lema::tools {
namespace {

struct VerifyArgs {
  std::string path;
  std::string budget;
  std::string page_size;
  std::string order = "layer";
  std::uint64_t seed = 0;
  std::string mode = "guard";
  std::string policy = "lru";
  unsigned passes = 1;
  bool huge_pages = false;
  std::string shared_host_cache;
  bool json = false;
};

/// The tensors' names in the order a pass visits them.
std::vector<std::string> visit_order(const io::Checkpoint& ckpt, const runtime::Layout& layout,
                                     const std::string& order, std::uint64_t seed) {
  std::vector<std::string> names;
  if (order == "file") {
    for (const auto& t : ckpt.tensors()) names.push_back(t.name);
  } else {
    for (const auto& t : layout.tensors()) names.push_back(t.name);
    if (order == "random") {
      std::mt19937_64 rng(seed);
      std::shuffle(names.begin(), names.end(), rng);
    }
  }
  return names;
}

std::string hex32(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

// Note [Blame on a changed CRC]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A tensor whose CRC differs between passes is either a file modified while verifying or a
// pager that returned wrong bytes. The tensor is then read again straight from its file (pread,
// no pager): bytes that differ from the first pass blame the file, and only a file that still
// holds the first pass's bytes blames the pager.
std::uint32_t file_crc(const io::Checkpoint& ckpt, const io::TensorInfo& t) {
  const std::string path = ckpt.files()[t.file].path.string();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd)
    throw io::ReadError(path, t.offset, t.nbytes, errno,
                        "reopening it to check tensor '" + t.name + "'");
  std::vector<std::byte> buf(std::size_t{4} << 20);
  auto crc = static_cast<std::uint32_t>(crc32(0L, Z_NULL, 0));
  std::uint64_t done = 0;
  while (done < t.nbytes) {
    const auto want =
        static_cast<std::size_t>(std::min<std::uint64_t>(buf.size(), t.nbytes - done));
    const ssize_t n = ::pread(fd.get(), buf.data(), want, static_cast<off_t>(t.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw io::ReadError(path, t.offset + done, want, n < 0 ? errno : 0,
                          "checking tensor '" + t.name +
                              "' in the file: it changed on disk "
                              "while verifying");
    crc = static_cast<std::uint32_t>(
        crc32(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<uInt>(n)));
    done += static_cast<std::uint64_t>(n);
  }
  return crc;
}

[[noreturn]] void throw_crc_changed(const io::Checkpoint& ckpt, const std::string& name,
                                    std::uint32_t first, std::uint32_t now) {
  const io::TensorInfo& t = ckpt.at(name);
  const std::uint32_t in_file = file_crc(ckpt, t);
  const std::string path = ckpt.files()[t.file].path.string();
  if (in_file != first)
    throw Error(path + ": tensor '" + name + "' changed on disk between passes (CRC32 " +
                hex32(first) + " in the first pass, " + hex32(in_file) +
                " in the file now): the file was modified while verifying; verify it again "
                "once nothing writes it");
  throw Error("tensor '" + name + "': CRC32 changed between passes (" + hex32(first) + " then " +
              hex32(now) + ") while " + path + " still holds " + hex32(in_file) +
              ": the pager returned different bytes");
}

int run_verify(const VerifyArgs& a) {
  runtime::MappedCheckpointOptions options;
  options.budget_bytes = parse_size(a.budget, "--budget");
  options.setting_names = {.budget = "--budget", .page_size = "--page-size"};
  if (!a.page_size.empty()) options.page_size = parse_size(a.page_size, "--page-size");
  if (!a.shared_host_cache.empty())
    options.shared_host_cache_bytes = parse_size(a.shared_host_cache, "--shared-host-cache");
  const auto policy = runtime::parse_policy(a.policy);
  LEMA_EXPECTS(policy.has_value(), "--policy must be lru or trace (got '" + a.policy + "')");
  options.policy = *policy;
  const auto mode = runtime::parse_residency_mode(a.mode);
  LEMA_EXPECTS(mode.has_value(), "--mode must be guard or fault (got '" + a.mode + "')");
  options.mode = *mode;
  options.huge_pages = a.huge_pages;
  options.read_only = true;  // verify only reads: a writable huge-page pool would need twice the pages
  LEMA_EXPECTS(a.order == "file" || a.order == "layer" || a.order == "random",
               "--order must be file, layer or random (got '" + a.order + "')");
  LEMA_EXPECTS(a.passes >= 1, "--passes must be at least 1");

  auto mapped = runtime::MappedCheckpoint::open(a.path, options);
  const auto names = visit_order(mapped->checkpoint(), mapped->layout(), a.order, a.seed);

  std::vector<std::uint32_t> crcs(names.size());
  for (unsigned pass = 0; pass < a.passes; ++pass) {
    for (std::size_t i = 0; i < names.size(); ++i) {
      std::uint32_t crc = static_cast<std::uint32_t>(crc32(0L, Z_NULL, 0));
      mapped->read_tensor(names[i], [&](const std::byte* data, std::uint64_t n) {
        crc = static_cast<std::uint32_t>(
            crc32(crc, reinterpret_cast<const Bytef*>(data), static_cast<uInt>(n)));
      });
      if (pass > 0 && crc != crcs[i])
        throw_crc_changed(mapped->checkpoint(), names[i], crcs[i], crc);
      crcs[i] = crc;
    }
    mapped->mark_step();
  }

  const runtime::PagerStats s = mapped->stats();
  if (a.json) {
    nlohmann::ordered_json out;
    out["tensors"] = nlohmann::json::array();
    for (std::size_t i = 0; i < names.size(); ++i)
      out["tensors"].push_back({{"name", names[i]}, {"crc32", hex32(crcs[i])}});
    out["stats"] = {{"faults", s.faults},
                    {"hits", s.hits},
                    {"bytes_read", s.bytes_read},
                    {"shared_cache_hits", s.shared_cache_hits},
                    {"shared_host_cache_bytes", s.shared_host_cache_bytes},
                    {"evictions", s.evictions},
                    {"prefetches_issued", s.prefetches_issued},
                    {"prefetches_used", s.prefetches_used},
                    {"prefetches_wasted", s.prefetches_wasted},
                    {"stall_ns", s.stall_ns},
                    {"peak_resident_bytes", s.peak_resident_bytes},
                    {"budget_bytes", s.budget_bytes},
                    {"page_size", s.page_size},
                    {"io_path", s.io_path},
                    {"mode", std::string(runtime::residency_mode_name(mapped->mode()))},
                    {"policy", a.policy},
                    {"passes", a.passes}};
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    std::size_t width = 4;
    for (const auto& n : names) width = std::max(width, n.size());
    for (std::size_t i = 0; i < names.size(); ++i)
      std::printf("%-*s  %s\n", static_cast<int>(width), names[i].c_str(), hex32(crcs[i]).c_str());
    std::printf(
        "\n%zu tensors, %u pass(es), mode %s, policy %s, io %s\n"
        "faults %llu  hits %llu  evictions %llu  prefetches %llu (used %llu, wasted %llu)\n"
        "read %s (shared cache hits %llu)  stall %.3f s  peak resident %s of budget %s (page "
        "%s)\n",
        names.size(), a.passes, std::string(runtime::residency_mode_name(mapped->mode())).c_str(),
        a.policy.c_str(), s.io_path.c_str(), (unsigned long long)s.faults,
        (unsigned long long)s.hits, (unsigned long long)s.evictions,
        (unsigned long long)s.prefetches_issued, (unsigned long long)s.prefetches_used,
        (unsigned long long)s.prefetches_wasted, format_size(s.bytes_read).c_str(),
        (unsigned long long)s.shared_cache_hits, static_cast<double>(s.stall_ns) * 1e-9, format_size(s.peak_resident_bytes).c_str(),
        format_size(s.budget_bytes).c_str(), format_size(s.page_size).c_str());
  }
  return 0;
}

}  // namespace

void register_verify(CLI::App& app) {
  auto args = std::make_shared<VerifyArgs>();
  auto* cmd = app.add_subcommand(
      "verify", "Read every tensor through the pager under a budget and print CRC32s");
  cmd->add_option("path", args->path, "checkpoint file or directory")->required();
  cmd->add_option("--budget", args->budget, "memory budget (e.g. 64MiB)")->required();
  cmd->add_option("--page-size", args->page_size, "page size (default: the backend's, 2MiB)");
  cmd->add_option("--order", args->order, "file | layer | random")->default_str("layer");
  cmd->add_option("--seed", args->seed, "seed of --order random");
  cmd->add_option("--mode", args->mode, "guard | fault (userfaultfd)")->default_str("guard");
  cmd->add_option("--policy", args->policy, "lru | trace")->default_str("lru");
  cmd->add_option("--passes", args->passes, "passes over all tensors")->default_str("1");
  cmd->add_option("--shared-host-cache", args->shared_host_cache,
                  "pages read kept in this much shared memory for every local process that "
                  "verifies the same checkpoint with it (one read per machine)");
  cmd->add_flag("--huge-pages", args->huge_pages,
                "take the page pool from the system's huge pages (vm.nr_hugepages)");
  cmd->add_flag("--json", args->json, "print JSON");
  cmd->callback([args] {
    int rc = run_verify(*args);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace lema::tools
