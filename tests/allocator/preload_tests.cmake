# The LD_PRELOAD hook (allocator/preload) in front of C programs linked against the fake CUDA
# runtime, and a Python process reaching it through ctypes. Not under sanitizers: an instrumented
# hook cannot be preloaded into an uninstrumented program (the sanitizer runtime must come first).
add_library(fake_cudart SHARED fakes/fake_cudart.cpp)
target_include_directories(fake_cudart PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/fakes)
target_link_libraries(fake_cudart PRIVATE Threads::Threads)
set_target_properties(fake_cudart PROPERTIES CXX_VISIBILITY_PRESET hidden)
lema_target_warnings(fake_cudart)

# The hook's setting parser, compiled in again here (the library exports only cuda* names).
lema_add_test(preload_settings_test
  SOURCES allocator/preload_settings_test.cpp ${PROJECT_SOURCE_DIR}/allocator/preload/src/settings.cpp
          ${PROJECT_SOURCE_DIR}/allocator/preload/src/report.cpp
  LIBS lema::base)
target_include_directories(preload_settings_test PRIVATE ${PROJECT_SOURCE_DIR}/allocator/preload/src)

add_executable(preload_program allocator/preload_program.c)
target_link_libraries(preload_program PRIVATE fake_cudart Threads::Threads)
lema_target_warnings(preload_program)
add_executable(preload_plain allocator/preload_plain.c)
target_link_libraries(preload_plain PRIVATE Threads::Threads)
lema_target_warnings(preload_plain)
add_executable(preload_no_runtime allocator/preload_no_runtime.c)
target_link_libraries(preload_no_runtime PRIVATE lema_preload)
lema_target_warnings(preload_no_runtime)

if(NOT LEMA_SANITIZE)
  set(_run ${CMAKE_CURRENT_SOURCE_DIR}/allocator/preload_run.sh)
  set(_prog $<TARGET_FILE:preload_program>)
  # preload_<name> LINES PATTERN ENV [PROGRAM ARGS...]
  function(lema_preload_test name lines pattern env)
    add_test(NAME preload_${name} COMMAND ${_run} ${lines} "${pattern}" ${ARGN})
    set_tests_properties(preload_${name} PROPERTIES
      ENVIRONMENT "LEMA_PRELOAD=$<TARGET_FILE:lema_preload>;FAKE_CUDART_TOTAL=1073741824;${env}"
      LABELS preload TIMEOUT 120)
  endfunction()
  lema_preload_test(routes 0 "" "LEMA_BUDGET=64M" ${_prog} routes)
  lema_preload_test(budget 0 "" "LEMA_BUDGET=64MiB" ${_prog} budget)
  lema_preload_test(budget_info 5 "cudaMallocAsync\\(16 MiB\\): over the budget of 64 MiB"
                    "LEMA_BUDGET=64M;LEMA_PRELOAD_LOG=info" ${_prog} budget)
  lema_preload_test(bad_threshold 1 "LEMA_PRELOAD_THRESHOLD='12X' is not a size"
                    "LEMA_BUDGET=64M;LEMA_PRELOAD_THRESHOLD=12X" ${_prog} passthrough)
  lema_preload_test(bad_budget 1 "LEMA_BUDGET='lots' is not a size"
                    "LEMA_BUDGET=lots" ${_prog} passthrough)
  lema_preload_test(bad_mode 1 "LEMA_PRELOAD_MODE='fast' is not managed or passthrough"
                    "LEMA_BUDGET=64M;LEMA_PRELOAD_MODE=fast" ${_prog} passthrough)
  lema_preload_test(bad_log 1 "LEMA_PRELOAD_LOG='loud' is not off, warn, info or debug"
                    "LEMA_BUDGET=64M;LEMA_PRELOAD_LOG=loud" ${_prog} passthrough)
  lema_preload_test(bad_events 1 "LEMA_PRELOAD_EVENTS='-3' is not a count of events"
                    "LEMA_BUDGET=64M;LEMA_PRELOAD_EVENTS=-3" ${_prog} passthrough)
  lema_preload_test(mode_passthrough 0 "" "LEMA_BUDGET=64M;LEMA_PRELOAD_MODE=passthrough"
                    ${_prog} passthrough)
  lema_preload_test(budget_over_device 1 "LEMA_BUDGET=2 GiB is more than the device's 1 GiB"
                    "LEMA_BUDGET=2G" ${_prog} passthrough)
  lema_preload_test(bad_free 1 "cudaFree\\(0x[0-9a-f]+\\): not memory of this process"
                    "LEMA_BUDGET=64M" ${_prog} bad_free)
  lema_preload_test(double_free 1 "cudaFree\\(0x[0-9a-f]+\\): double free of managed memory"
                    "LEMA_BUDGET=64M" ${_prog} double_free)
  lema_preload_test(table_full 1 "the pointer table is full \\(12 allocations live\\)"
                    "LEMA_PRELOAD_TABLE=16" ${_prog} table_full)
  lema_preload_test(fork 0 "" "LEMA_BUDGET=64M" ${_prog} fork)
  lema_preload_test(threads 0 "" "LEMA_BUDGET=64M" ${_prog} threads)
  lema_preload_test(zero_threshold 0 "" "LEMA_PRELOAD_THRESHOLD=0" ${_prog} zero_threshold)
  lema_preload_test(plain_program 0 "" "LEMA_BUDGET=64M" $<TARGET_FILE:preload_plain>)
  lema_preload_test(no_runtime 1 "cudaMalloc: no CUDA runtime in this process" "LEMA_BUDGET=64M"
                    $<TARGET_FILE:preload_no_runtime>)
  # The same program through ctypes from Python, and the profile summary read by `lema prof`.
  if(LEMA_PYTHON)
    add_test(NAME python_preload
             COMMAND ${LEMA_PYTHON} -m pytest -q -p no:cacheprovider
                     ${CMAKE_CURRENT_SOURCE_DIR}/python/test_preload.py
             WORKING_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
    set_tests_properties(python_preload PROPERTIES
      ENVIRONMENT "LEMA_PRELOAD=$<TARGET_FILE:lema_preload>;LEMA_FAKE_CUDART=$<TARGET_FILE:fake_cudart>;LEMA_BIN=$<TARGET_FILE:lema>;PYTHONDONTWRITEBYTECODE=1"
      LABELS "python;preload" TIMEOUT 300)
  endif()
endif()

# The device benchmark's script cannot run here: its syntax and arguments are checked.
if(LEMA_PYTHON)
  add_test(NAME preload_device_script
           COMMAND ${LEMA_PYTHON} ${PROJECT_SOURCE_DIR}/benchmarks/device/preload_oversubscribe.py --help)
  set_tests_properties(preload_device_script PROPERTIES LABELS preload TIMEOUT 60
                       PASS_REGULAR_EXPRESSION "--preload PRELOAD")
endif()
