#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "cli_logging.hpp"
#include "commands.hpp"
#include "lema/io/errors.hpp"

int main(int argc, char** argv) {
  CLI::App app{"lema: fine-tune language models whose weights do not fit in memory"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "lema 0.1.0");
  lema::tools::register_inspect(app);
  lema::tools::register_gen(app);
  lema::tools::register_verify(app);
  lema::tools::register_bench(app);
  lema::tools::register_prof(app);
  lema::tools::register_trainer_commands(app);
  lema::tools::configure_cli_logging();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const lema::io::CheckpointError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
