# Options. Optional dependencies are AUTO (use when found), ON (required) or OFF.
set(LEMA_WITH_URING AUTO CACHE STRING "io_uring reader through liburing: AUTO/ON/OFF")
set(LEMA_WITH_TORCH AUTO CACHE STRING "libtorch plugin and trainer: AUTO/ON/OFF")
set(LEMA_WITH_CUDA AUTO CACHE STRING "CUDA backends (toolkit headers only; no libcuda link): AUTO/ON/OFF")
set(LEMA_WITH_NCCL AUTO CACHE STRING "Data parallelism over NCCL through a CUDA torch's ProcessGroupNCCL: AUTO/ON/OFF")
set_property(CACHE LEMA_WITH_URING LEMA_WITH_TORCH LEMA_WITH_CUDA LEMA_WITH_NCCL PROPERTY STRINGS AUTO ON OFF)
option(LEMA_BUILD_TESTS "Build the tests" ON)
option(LEMA_BUILD_BENCHMARKS "Build the benchmarks" ON)
option(LEMA_BUILD_FUZZERS "Build libFuzzer targets (needs clang)" OFF)
set(LEMA_SANITIZE "" CACHE STRING "Sanitizers for our targets: '', 'address,undefined' or 'thread'")
# Off for a build on a machine whose compiler may warn where ours does not (the device run).
option(LEMA_WERROR "Treat compiler warnings as errors in our targets" ON)
set(LEMA_PYTHON "" CACHE FILEPATH "Python of the venv with torch/transformers/peft/safetensors (for the cross-check tests)")

# Warnings (as errors unless LEMA_WERROR is off) for our own targets, applied PRIVATE.
function(lema_target_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra)
  if(LEMA_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

if(LEMA_SANITIZE)
  add_compile_options(-fsanitize=${LEMA_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${LEMA_SANITIZE})
endif()
