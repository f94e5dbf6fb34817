#include "chat_prompt.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "lema/base/error.hpp"

extern char** environ;

namespace lema::tools {
namespace {

namespace fs = std::filesystem;

// Note [Chat prompts through Python]
// A chat template is Jinja2 as transformers runs it (its sandboxed environment, loop controls,
// raise_exception, strftime_now, tojson with its own escaping ...), and models' templates lean
// on those details; Debian has no C++ Jinja, and a partial one would render some templates
// differently from apply_chat_template without saying so. So the prompt is rendered by
// transformers itself, in a child `python -m lema.data render-chat`, which also returns the ids
// (the C++ tokenizer may not read the model's tokenizer.json). The python is, in order:
// $LEMA_PYTHON; the python beside this executable (pip installs lema-trainer into the scripts
// folder of the environment that holds the lema package and transformers); python3 on PATH.
std::string chosen_python() {
  if (const char* env = std::getenv("LEMA_PYTHON"); env != nullptr && *env != '\0') return env;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const char* name : {"python3", "python"}) {
      const fs::path beside = self.parent_path() / name;
      if (::access(beside.c_str(), X_OK) == 0) return beside.string();
    }
  }
  return "python3";
}

std::string last_line(const std::string& text) {
  std::string line, last;
  std::istringstream in(text);
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  }
  return last;
}

}  // namespace

ChatPrompt render_chat_prompt(const fs::path& model_dir, const std::string& prompt) {
  const std::string python = chosen_python();
  const auto fail = [&](const std::string& why) {
    return InvalidArgument(fmt::format(
        "--chat renders the chat template with transformers through {} -m lema.data, which "
        "failed: {}; install lema and transformers in that python, or set LEMA_PYTHON to one "
        "that has them",
        python, why));
  };
  char err_path[] = "/tmp/lema-chat-XXXXXX";
  const int err_fd = ::mkstemp(err_path);
  if (err_fd < 0) throw fail(fmt::format("no temporary file ({})", std::strerror(errno)));
  ::unlink(err_path);
  int out_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
    ::close(err_fd);
    throw fail(fmt::format("no pipe ({})", std::strerror(errno)));
  }
  posix_spawn_file_actions_t actions;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawn_file_actions_adddup2(&actions, out_pipe[1], STDOUT_FILENO);
  ::posix_spawn_file_actions_adddup2(&actions, err_fd, STDERR_FILENO);
  ::posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  const std::string model = model_dir.string();
  std::vector<std::string> args = {python,    "-m",  "lema.data", "render-chat",
                                   "--model", model, "--prompt",  prompt};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int spawned = ::posix_spawnp(&pid, python.c_str(), &actions, nullptr, argv.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  ::close(out_pipe[1]);
  std::string out;
  if (spawned == 0) {
    char buf[65536];
    for (ssize_t n; (n = ::read(out_pipe[0], buf, sizeof buf)) != 0;) {
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) break;
      out.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(out_pipe[0]);
  int status = 0;
  if (spawned == 0) {
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
  }
  std::string err;
  if (::lseek(err_fd, 0, SEEK_SET) == 0) {
    char buf[4096];
    for (ssize_t n; (n = ::read(err_fd, buf, sizeof buf)) > 0;) {
      err.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(err_fd);
  if (spawned != 0) throw fail(fmt::format("it cannot be run ({})", std::strerror(spawned)));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string why = last_line(err);
    if (why.empty())
      why = fmt::format("exit status {}", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    // The script's own refusals (no chat_template, a template error) are already one line that
    // says what to do; only a broken environment needs the installation hint.
    if (why.rfind("error: ", 0) == 0) throw InvalidArgument("--chat: " + why.substr(7));
    throw fail(why);
  }
  const nlohmann::json j = nlohmann::json::parse(last_line(out), nullptr, false);
  if (!j.is_object() || !j.contains("input_ids") || !j["input_ids"].is_array()) {
    throw fail("it printed no {\"input_ids\": ...} line");
  }
  ChatPrompt result;
  for (const auto& id : j["input_ids"]) {
    if (!id.is_number_integer()) throw fail("an input id is not an integer");
    result.ids.push_back(id.get<std::int64_t>());
  }
  if (j.contains("text") && j["text"].is_string()) result.text = j["text"].get<std::string>();
  if (j.contains("eos_token_id") && j["eos_token_id"].is_number_integer()) {
    result.eos = j["eos_token_id"].get<std::int64_t>();
  }
  return result;
}

}  // namespace lema::tools
