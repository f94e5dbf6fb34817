// The command-line tools' log format, set up from a translation unit free of libtorch's headers
// (libtorch bundles another fmt than the one spdlog is built with).
#pragma once

namespace lema::tools {

/// "warning: ..." lines on stderr; only warnings and errors unless LEMA_LOG_LEVEL names another
/// spdlog level (debug, info, ...).
void configure_cli_logging();

}  // namespace lema::tools
