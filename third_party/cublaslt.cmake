# Locates cublasLt.h (headers only: the library is dlopen'ed at run time, never linked). Order:
# LSERVE_CUBLASLT_INCLUDE_DIR, the CUDA toolkit's include directories, then the nvidia-cublas pip
# package of the build's Python (a build requirement in pyproject.toml, for toolkits without
# cuBLAS such as a bare nvcc). Sets LSERVE_CUBLASLT_INCLUDE_DIR_FOUND or leaves it empty.
set(LSERVE_CUBLASLT_INCLUDE_DIR "" CACHE PATH "directory of cublasLt.h (default: toolkit, then nvidia-cublas)")
set(LSERVE_CUBLASLT_INCLUDE_DIR_FOUND "")
set(_lserve_cublas_candidates ${LSERVE_CUBLASLT_INCLUDE_DIR} ${CUDAToolkit_INCLUDE_DIRS})
if(Python_EXECUTABLE)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
            "import nvidia, os; print(';'.join(os.path.join(p, s, 'include') \
for p in nvidia.__path__ for s in ('cu13', 'cublas', 'cu12')))"
    OUTPUT_VARIABLE _lserve_pip_dirs OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _lserve_rc ERROR_QUIET)
  if(_lserve_rc EQUAL 0)
    list(APPEND _lserve_cublas_candidates ${_lserve_pip_dirs})
  endif()
endif()
foreach(_lserve_dir IN LISTS _lserve_cublas_candidates)
  if(_lserve_dir AND EXISTS "${_lserve_dir}/cublasLt.h" AND EXISTS "${_lserve_dir}/cublas_api.h")
    set(LSERVE_CUBLASLT_INCLUDE_DIR_FOUND "${_lserve_dir}")
    break()
  endif()
endforeach()
