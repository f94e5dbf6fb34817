// lema-trainer: the commands that need libtorch. Users reach them as `lema train|merge|generate`.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "../cli_logging.hpp"
#include "commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"lema: fine-tune language models whose weights do not fit in memory"};
  app.name("lema");  // usage lines read as the command the user typed
  app.require_subcommand(1);
  lema::tools::register_train(app);
  lema::tools::register_merge(app);
  lema::tools::register_generate(app);
  lema::tools::configure_cli_logging();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
