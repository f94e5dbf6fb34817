# The Python package's files as `pip install .` (scikit-build-core, pyproject.toml) lays them out:
# component `python`, installed only when asked for by name (scikit-build-core does; a plain
# `cmake --install` of the C++ tree does not).
#   <platlib>/lema/liblema_torch_ops.so, <platlib>/lema/lema_torch_ops.torch_version
#   <platlib>/lema/liblema_cuda_alloc.so  (builds with the CUDA toolkit's headers; lema.cuda_alloc)
#   <scripts>/lema, <scripts>/lema-trainer  (on PATH in the environment installed into)
# The Python sources themselves (python/lema) are added to the wheel by scikit-build-core.

# Note [Torch version record]: the ops library links one libtorch's C++ symbols; loaded into
# another torch it fails with an undefined symbol or worse. The version of the torch it was
# built against is written beside it (the build tree and the installed package alike), and
# lema.load_library() compares it with the torch imported before loading anything.
if(TARGET lema_torch_ops AND LEMA_PYTHON)
  execute_process(COMMAND ${LEMA_PYTHON} -c "import torch; print(torch.__version__)"
                  OUTPUT_VARIABLE LEMA_TORCH_PY_VERSION OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _lema_torch_version_rc ERROR_QUIET)
  if(_lema_torch_version_rc EQUAL 0 AND LEMA_TORCH_PY_VERSION)
    file(GENERATE OUTPUT $<TARGET_FILE_DIR:lema_torch_ops>/lema_torch_ops.torch_version
         CONTENT "${LEMA_TORCH_PY_VERSION}\n")
    install(FILES $<TARGET_FILE_DIR:lema_torch_ops>/lema_torch_ops.torch_version
            DESTINATION lema COMPONENT python EXCLUDE_FROM_ALL)
  endif()
endif()

if(NOT SKBUILD_SCRIPTS_DIR)
  set(SKBUILD_SCRIPTS_DIR bin)
endif()
if(TARGET lema_torch_ops)
  # Installed into site-packages/lema/, beside torch/: libtorch is found there relative to the
  # library (and is loaded already anyway: `import torch` comes first).
  install(TARGETS lema_torch_ops LIBRARY DESTINATION lema COMPONENT python EXCLUDE_FROM_ALL)
endif()
if(TARGET lema_cuda_alloc)
  # Links neither torch nor the CUDA runtime: one library serves every torch version.
  install(TARGETS lema_cuda_alloc LIBRARY DESTINATION lema COMPONENT python EXCLUDE_FROM_ALL)
endif()
install(TARGETS lema RUNTIME DESTINATION ${SKBUILD_SCRIPTS_DIR} COMPONENT python EXCLUDE_FROM_ALL)
if(TARGET lema_trainer_cli)
  install(TARGETS lema_trainer_cli RUNTIME DESTINATION ${SKBUILD_SCRIPTS_DIR}
          COMPONENT python EXCLUDE_FROM_ALL)
endif()
