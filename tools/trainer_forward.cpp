// `lema train|merge|generate`: handed to the lema-trainer executable beside this one, which links
// libtorch; the other commands stay free of it and start in milliseconds.
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "commands.hpp"
#include "lema/base/error.hpp"

namespace lema::tools {
namespace {

constexpr const char* kTrainerExecutable = "lema-trainer";

[[noreturn]] void exec_trainer(const std::string& command, const std::vector<std::string>& rest) {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  const std::filesystem::path trainer =
      (ec ? std::filesystem::path(".") : self.parent_path()) / kTrainerExecutable;
  if (!std::filesystem::exists(trainer)) {
    throw Error("'lema " + command + "' needs " + trainer.string() +
                ", which this build lacks: LEMA was built without libtorch; configure with "
                "-DLEMA_PYTHON=<a python whose torch provides libtorch> (make does) and rebuild");
  }
  std::vector<std::string> args = {trainer.string(), command};
  args.insert(args.end(), rest.begin(), rest.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  ::execv(trainer.c_str(), argv.data());
  throw SystemError("cannot run " + trainer.string(), errno);
}

}  // namespace

void register_trainer_commands(CLI::App& app) {
  const std::pair<const char*, const char*> commands[] = {
      {"train", "Fine-tune a LoRA adapter on a model larger than the memory budget"},
      {"merge", "Merge a LoRA adapter into the base weights (streamed under the budget)"},
      {"generate", "Continue a prompt with a model (and an adapter) under a memory budget"},
  };
  for (const auto& [name, help] : commands) {
    CLI::App* cmd = app.add_subcommand(name, help);
    cmd->prefix_command();  // every argument, --help included, goes to lema-trainer
    cmd->set_help_flag();
    const std::string command = name;
    cmd->callback([cmd, command] { exec_trainer(command, cmd->remaining()); });
  }
}

}  // namespace lema::tools
