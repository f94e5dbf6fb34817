// The lema subcommands. Each registers itself on the CLI::App and runs when chosen.
// Errors are thrown as lema::Error (or subclasses); main() prints them as one line
// `error: <what>` and exits 1.
#pragma once

namespace CLI {
class App;
}

namespace lema::tools {

void register_inspect(CLI::App& app);
void register_gen(CLI::App& app);
void register_verify(CLI::App& app);
void register_bench(CLI::App& app);  // bench io (and later bench pager ...)
void register_bench_pager(CLI::App& bench);
void register_bench_fallback(CLI::App& bench);
void register_prof(CLI::App& app);  // prof record | top | report
/// train, merge, generate: run by the lema-trainer executable (trainer_forward.cpp).
void register_trainer_commands(CLI::App& app);

}  // namespace lema::tools
