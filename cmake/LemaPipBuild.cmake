# Note [Torch of the environment installed into]: `pip install .` runs this configure through
# scikit-build-core (SKBUILD set) with the interpreter of the environment being installed into,
# its own site-packages hidden by pip's build isolation (PYTHONPATH and PYTHONNOUSERSITE point it
# at a scratch overlay). The ops library must link the torch that environment imports, not one
# pip would download into the overlay: so the interpreter is asked with those two unset, and the
# torch plugin is required (a wheel without it is no use to Python).
if(SKBUILD AND NOT LEMA_PYTHON)
  if(NOT Python_EXECUTABLE)
    message(FATAL_ERROR "scikit-build-core passed no Python_EXECUTABLE; pass -DLEMA_PYTHON=...")
  endif()
  set(LEMA_PYTHON "${Python_EXECUTABLE}" CACHE FILEPATH "Python with torch" FORCE)
  unset(ENV{PYTHONPATH})
  unset(ENV{PYTHONNOUSERSITE})
  execute_process(COMMAND ${LEMA_PYTHON} -c "import torch"
                  RESULT_VARIABLE _lema_torch_rc OUTPUT_QUIET ERROR_QUIET)
  if(NOT _lema_torch_rc EQUAL 0)
    message(FATAL_ERROR "lema: ${LEMA_PYTHON} cannot import torch: install torch into this "
                        "environment first (pip install torch), then pip install lema again")
  endif()
  set(LEMA_WITH_TORCH ON CACHE STRING "" FORCE)
endif()
