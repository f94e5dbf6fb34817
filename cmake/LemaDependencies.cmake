# Finds the dependencies and records what was found for the summary.
find_package(Threads REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(ZLIB REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)

set(LEMA_FOUND_SUMMARY "")
macro(lema_found what value)
  list(APPEND LEMA_FOUND_SUMMARY "${what}: ${value}")
endmacro()

# liburing (pkg-config or plain find).
set(LEMA_HAVE_URING OFF)
if(NOT LEMA_WITH_URING STREQUAL "OFF")
  find_path(URING_INCLUDE_DIR liburing.h)
  find_library(URING_LIBRARY uring)
  if(URING_INCLUDE_DIR AND URING_LIBRARY)
    add_library(lema_uring_dep INTERFACE)
    target_include_directories(lema_uring_dep INTERFACE ${URING_INCLUDE_DIR})
    target_link_libraries(lema_uring_dep INTERFACE ${URING_LIBRARY})
    set(LEMA_HAVE_URING ON)
  elseif(LEMA_WITH_URING STREQUAL "ON")
    message(FATAL_ERROR "LEMA_WITH_URING=ON but liburing was not found (apt-get install liburing-dev)")
  endif()
endif()
lema_found("liburing" "${LEMA_HAVE_URING}")

# SentencePiece (tokenizer.model files) for the trainer's text data; optional.
set(LEMA_HAVE_SENTENCEPIECE OFF)
find_path(SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h)
find_library(SENTENCEPIECE_LIBRARY sentencepiece)
if(SENTENCEPIECE_INCLUDE_DIR AND SENTENCEPIECE_LIBRARY)
  add_library(lema_sentencepiece_dep INTERFACE)
  target_include_directories(lema_sentencepiece_dep INTERFACE ${SENTENCEPIECE_INCLUDE_DIR})
  target_link_libraries(lema_sentencepiece_dep INTERFACE ${SENTENCEPIECE_LIBRARY})
  set(LEMA_HAVE_SENTENCEPIECE ON)
endif()
lema_found("SentencePiece" "${LEMA_HAVE_SENTENCEPIECE}")

# PCRE2 (the Split regexes) and utf8proc (normalization forms, character classes) for the
# tokenizer.json reader; required, through pkg-config. An INTERFACE target so the installed
# package names the libraries the static trainer library needs.
find_package(PkgConfig REQUIRED)
pkg_check_modules(LEMA_PCRE2 QUIET libpcre2-8)
pkg_check_modules(LEMA_UTF8PROC QUIET libutf8proc)
if(NOT LEMA_PCRE2_FOUND OR NOT LEMA_UTF8PROC_FOUND)
  message(FATAL_ERROR "PCRE2 or utf8proc not found through pkg-config (the tokenizer.json reader "
                      "needs both): apt-get install libpcre2-dev libutf8proc-dev, or run scripts/setup.sh")
endif()
add_library(lema_tokenizer_json_dep INTERFACE)
target_include_directories(lema_tokenizer_json_dep INTERFACE
  ${LEMA_PCRE2_INCLUDE_DIRS} ${LEMA_UTF8PROC_INCLUDE_DIRS})
target_link_libraries(lema_tokenizer_json_dep INTERFACE
  ${LEMA_PCRE2_LINK_LIBRARIES} ${LEMA_UTF8PROC_LINK_LIBRARIES})
lema_found("PCRE2" "${LEMA_PCRE2_VERSION}")
lema_found("utf8proc" "${LEMA_UTF8PROC_VERSION}")

# CUDA toolkit headers (the backends dlopen the driver; nothing links libcuda).
set(LEMA_HAVE_CUDA OFF)
if(NOT LEMA_WITH_CUDA STREQUAL "OFF")
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    set(LEMA_HAVE_CUDA ON)
    lema_found("CUDA toolkit" "${CUDAToolkit_VERSION} (${CUDAToolkit_INCLUDE_DIRS})")
  elseif(LEMA_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "LEMA_WITH_CUDA=ON but the CUDA toolkit was not found")
  else()
    lema_found("CUDA toolkit" "not found")
  endif()
else()
  lema_found("CUDA toolkit" "OFF")
endif()

# libtorch from the torch wheel of LEMA_PYTHON (torch.utils.cmake_prefix_path).
set(LEMA_HAVE_TORCH OFF)
if(LEMA_PYTHON AND NOT EXISTS "${LEMA_PYTHON}")
  # LEMA_PYTHON is a FILEPATH: a bare name (python3) has become a path under the working directory.
  message(WARNING "LEMA_PYTHON='${LEMA_PYTHON}' does not exist: pass an absolute path, "
                  "e.g. -DLEMA_PYTHON=$(command -v python3)")
endif()
if(NOT LEMA_WITH_TORCH STREQUAL "OFF")
  if(LEMA_PYTHON)
    execute_process(COMMAND ${LEMA_PYTHON} -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
                    OUTPUT_VARIABLE LEMA_TORCH_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE
                    RESULT_VARIABLE _torch_rc ERROR_QUIET)
    if(_torch_rc EQUAL 0)
      list(APPEND CMAKE_PREFIX_PATH ${LEMA_TORCH_PREFIX})
    endif()
  endif()
  if(LEMA_WITH_TORCH STREQUAL "ON" AND NOT LEMA_TORCH_PREFIX)
    message(FATAL_ERROR "LEMA_WITH_TORCH=ON but no torch found through LEMA_PYTHON='${LEMA_PYTHON}'")
  endif()
  # Naming the CUDA architectures skips the wheel's GPU detection, a try_run that fails under
  # our C++20 default; nothing here compiles CUDA against torch.
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
  endif()
  find_package(Torch QUIET)
  if(Torch_FOUND)
    set(LEMA_HAVE_TORCH ON)
    # The wheel's libtorch needs the NVIDIA libraries it ships beside it to resolve at link time.
    get_filename_component(_torch_site "${TORCH_INSTALL_PREFIX}/.." ABSOLUTE)
    file(GLOB LEMA_TORCH_NVIDIA_LIBDIRS LIST_DIRECTORIES true "${_torch_site}/nvidia/*/lib")
    list(JOIN LEMA_TORCH_NVIDIA_LIBDIRS ":" _torch_rpath_link)
    set(LEMA_TORCH_LINK_OPTIONS "")
    # Compile definitions of our own translation units that see torch's headers (see
    # torch_plugin/CMakeLists.txt): fmt header-only, since torch's fmt shadows the system's.
    set(LEMA_TORCH_UNIT_DEFINITIONS FMT_HEADER_ONLY=1)
    if(_torch_rpath_link)
      set(LEMA_TORCH_LINK_OPTIONS "LINKER:-rpath-link,${_torch_rpath_link}")
    endif()
    lema_found("libtorch" "${Torch_VERSION} (${TORCH_INSTALL_PREFIX})")
  elseif(LEMA_WITH_TORCH STREQUAL "ON")
    message(FATAL_ERROR "LEMA_WITH_TORCH=ON but find_package(Torch) failed under '${LEMA_TORCH_PREFIX}'")
  else()
    message(STATUS "libtorch not found: the torch plugin is off (set LEMA_PYTHON to a Python with torch)")
    lema_found("libtorch" "not found")
  endif()
else()
  lema_found("libtorch" "OFF")
endif()

# NCCL, through the ProcessGroupNCCL of a CUDA torch (libtorch_cuda, which loads libnccl): found
# when that torch ships the header and the library, the CUDA toolkit's headers are here, and
# nccl.h is (the wheel's nvidia/nccl, or the toolkit's). A CPU-only torch leaves it off; the
# trainer then refuses --dist-backend nccl in one line (trainer/src/distributed_nccl.cpp).
set(LEMA_HAVE_NCCL OFF)
if(LEMA_HAVE_TORCH AND NOT LEMA_WITH_NCCL STREQUAL "OFF")
  find_library(LEMA_TORCH_CUDA_LIBRARY torch_cuda PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH)
  find_path(LEMA_NCCL_INCLUDE_DIR nccl.h
            HINTS "${TORCH_INSTALL_PREFIX}/../nvidia/nccl/include" ${CUDAToolkit_INCLUDE_DIRS})
  if(LEMA_HAVE_CUDA AND LEMA_TORCH_CUDA_LIBRARY AND LEMA_NCCL_INCLUDE_DIR AND EXISTS
     "${TORCH_INSTALL_PREFIX}/include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp")
    set(LEMA_HAVE_NCCL ON)
    lema_found("NCCL" "through ${LEMA_TORCH_CUDA_LIBRARY} (nccl.h in ${LEMA_NCCL_INCLUDE_DIR})")
  elseif(LEMA_WITH_NCCL STREQUAL "ON")
    message(FATAL_ERROR "LEMA_WITH_NCCL=ON but this torch has no libtorch_cuda/ProcessGroupNCCL, "
                        "or nccl.h or the CUDA toolkit was not found")
  else()
    lema_found("NCCL" "not found (a CPU-only torch, or no nccl.h / CUDA toolkit)")
  endif()
else()
  lema_found("NCCL" "OFF")
endif()

function(lema_print_summary)
  message(STATUS "LEMA configuration:")
  foreach(line ${LEMA_FOUND_SUMMARY})
    message(STATUS "  ${line}")
  endforeach()
  message(STATUS "  sanitizers: '${LEMA_SANITIZE}'  python: '${LEMA_PYTHON}'")
endfunction()
