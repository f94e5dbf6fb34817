// The trainer's subcommands (`lema train`, `lema merge`, `lema generate`), built into the
// lema-trainer executable that `lema` hands them to, so that the other commands start without
// loading libtorch.
#pragma once

namespace CLI {
class App;
}

namespace lema::tools {

void register_train(CLI::App& app);
void register_merge(CLI::App& app);
void register_generate(CLI::App& app);

}  // namespace lema::tools
