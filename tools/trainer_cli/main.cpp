// lema-trainer: the commands that need libtorch. Users reach them as `lema train|merge|generate`.
#include <c10/util/Exception.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>

#include "../cli_logging.hpp"
#include "commands.hpp"
#include "launch.hpp"

namespace {

// Note [One-line errors]: an error reaches the user as one line. c10::Error (what LEMA's errors
// become when they pass through torch: the residency guard's budget errors, a refused write)
// carries libtorch's stack frames in what(); only its message is for the user. Torch may also
// join context to a message over several lines.
void print_error(std::string text) {
  for (char& c : text) {
    if (c == '\n') c = ' ';
  }
  while (!text.empty() && text.back() == ' ') text.pop_back();
  std::fprintf(stderr, "error: %s\n", text.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"lema: fine-tune language models whose weights do not fit in memory"};
  app.name("lema");  // usage lines read as the command the user typed
  app.require_subcommand(1);
  lema::tools::register_train(app);
  lema::tools::register_merge(app);
  lema::tools::register_generate(app);
  lema::tools::configure_cli_logging();
  lema::tools::remember_command_line(argc, argv);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const c10::Error& e) {
    print_error(e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    print_error(e.what());
    return 1;
  }
  return 0;
}
