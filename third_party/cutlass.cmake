# Locates the CUTLASS/CuTe headers that the nvidia-cutlass pip package ships (a build requirement in
# pyproject.toml): LSERVE_CUTLASS_INCLUDE_DIR if given, else asked of the build's Python. Sets
# LSERVE_CUTLASS_INCLUDE_DIR_FOUND to the directory holding cute/tensor.hpp, or leaves it empty.
# Not cached: an isolated pip build's environment is gone by the next configure.
set(LSERVE_CUTLASS_INCLUDE_DIR "" CACHE PATH "CUTLASS include directory (default: from the nvidia-cutlass package)")
set(LSERVE_CUTLASS_INCLUDE_DIR_FOUND "")
if(LSERVE_CUTLASS_INCLUDE_DIR AND EXISTS "${LSERVE_CUTLASS_INCLUDE_DIR}/cute/tensor.hpp")
  set(LSERVE_CUTLASS_INCLUDE_DIR_FOUND "${LSERVE_CUTLASS_INCLUDE_DIR}")
elseif(Python_EXECUTABLE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import cutlass_library, os; \
print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
    OUTPUT_VARIABLE _lserve_cutlass_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _lserve_rc ERROR_QUIET)
  if(_lserve_rc EQUAL 0 AND EXISTS "${_lserve_cutlass_dir}/cute/tensor.hpp")
    set(LSERVE_CUTLASS_INCLUDE_DIR_FOUND "${_lserve_cutlass_dir}")
  endif()
endif()
