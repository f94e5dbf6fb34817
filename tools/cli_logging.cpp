#include "cli_logging.hpp"

#include <spdlog/spdlog.h>

#include <cstdlib>

namespace lema::tools {

void configure_cli_logging() {
  spdlog::set_pattern("%^%l%$: %v");
  spdlog::set_level(spdlog::level::warn);
  if (const char* level = std::getenv("LEMA_LOG_LEVEL")) {
    spdlog::set_level(spdlog::level::from_str(level));
  }
}

}  // namespace lema::tools
