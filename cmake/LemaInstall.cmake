# `cmake --install` lays out headers, libraries, the tool and a CMake package, so a user's project
# can `find_package(lema)` and link lema::torch (or lema::runtime, lema::io, lema::base).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(LEMA_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/lema)

# Exported names drop the lema_ prefix: lema_torch → lema::torch.
set(_lema_exported lema_base lema_io lema_runtime lema_allocator)
foreach(dep lema_allocator_vmm lema_cuda lema_uring_dep lema_sentencepiece_dep
    lema_tokenizer_json_dep)
  if(TARGET ${dep})
    list(APPEND _lema_exported ${dep})  # targets our static libraries link through
  endif()
endforeach()
foreach(lib lema_torch lema_trainer_data lema_trainer)
  if(TARGET ${lib})
    list(APPEND _lema_exported ${lib})
  endif()
endforeach()
foreach(target ${_lema_exported})
  string(REGEX REPLACE "^lema_" "" short ${target})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${short})
endforeach()

install(TARGETS ${_lema_exported} EXPORT lemaTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS lema RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

# Note [Installed RPATH]: what is installed and links libtorch finds it without LD_LIBRARY_PATH
# through its RUNPATH: the lib directory of the torch found at configure time (absolute: the
# wheel stays where it is) and our own lib directory relative to $ORIGIN (the prefix may move).
# Nothing else: the link path of ${TORCH_LIBRARIES} carries entries such as /lib/intel64 from
# torch's CMake package (its MKL and CUDA search paths) that name nothing on this machine and
# only slow every library lookup, and an empty entry would mean the working directory.
# libtorch's own dependencies (the NVIDIA libraries of a CUDA wheel) resolve through libtorch's
# RUNPATH. tests/install/check_install.sh runs the installed commands in a clean environment
# and checks every entry.
set(LEMA_INSTALL_RPATH_BIN "$ORIGIN/../${CMAKE_INSTALL_LIBDIR}")
set(LEMA_INSTALL_RPATH_LIB "$ORIGIN")
if(LEMA_HAVE_TORCH)
  get_filename_component(LEMA_TORCH_LIBDIR "${TORCH_INSTALL_PREFIX}/lib" ABSOLUTE)
  list(APPEND LEMA_INSTALL_RPATH_BIN "${LEMA_TORCH_LIBDIR}")
  list(APPEND LEMA_INSTALL_RPATH_LIB "${LEMA_TORCH_LIBDIR}")
endif()
if(TARGET lema_trainer_cli)
  set_target_properties(lema_trainer_cli PROPERTIES INSTALL_RPATH "${LEMA_INSTALL_RPATH_BIN}"
                                                    INSTALL_RPATH_USE_LINK_PATH FALSE)
  install(TARGETS lema_trainer_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
if(TARGET lema_torch_ops)
  # $ORIGIN/../torch/lib: the torch beside it in site-packages when pip installed it (LemaPython).
  set_target_properties(lema_torch_ops PROPERTIES INSTALL_RPATH "${LEMA_INSTALL_RPATH_LIB};$ORIGIN/../torch/lib"
                                                  INSTALL_RPATH_USE_LINK_PATH FALSE)
  install(TARGETS lema_torch_ops LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
endif()

foreach(component base io runtime allocator allocator/vmm torch_plugin trainer)
  if(EXISTS ${PROJECT_SOURCE_DIR}/${component}/include)
    install(DIRECTORY ${PROJECT_SOURCE_DIR}/${component}/include/
            DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  endif()
endforeach()

install(EXPORT lemaTargets NAMESPACE lema:: DESTINATION ${LEMA_INSTALL_CMAKEDIR})

# What the config must find again for the exported targets: the packages our static libraries
# link, and the same libtorch (by the directory it was found in here).
set(LEMA_CONFIG_TORCH_DIR "")
if(LEMA_HAVE_TORCH)
  set(LEMA_CONFIG_TORCH_DIR "${Torch_DIR}")
endif()
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/lemaConfig.cmake.in
  ${PROJECT_BINARY_DIR}/lemaConfig.cmake INSTALL_DESTINATION ${LEMA_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/lemaConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/lemaConfig.cmake ${PROJECT_BINARY_DIR}/lemaConfigVersion.cmake
        DESTINATION ${LEMA_INSTALL_CMAKEDIR})
