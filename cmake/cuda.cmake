# Optional CUDA backend (src/backend/cuda, docs/gpu.md). Included from CMakeLists.txt right after
# the options and BEFORE any target exists: enable_language(CUDA) must precede the targets, else
# C targets that link CUDA objects get "CUDA_ARCHITECTURES is empty".
#
#   -DDITMOE_CUDA=AUTO (default)  CUDA when nvcc is found (CUDACXX, CMAKE_CUDA_COMPILER or PATH)
#   -DDITMOE_CUDA=ON              CUDA or a configure error
#   -DDITMOE_CUDA=OFF             nothing CUDA; the build needs no toolkit at all
#   -DCMAKE_CUDA_ARCHITECTURES=90 (default: sm_90 SASS + compute_90 PTX; e.g. "80;90" for more)
#
# Host code in src/backend/cuda/*.c is plain C11 (compiled by the C compiler); kernels in
# src/backend/cuda/*.cu (C-style CUDA C++17, extern "C" launchers); Hopper-only sources
# (*.sm90a.cu) form their own object library built for sm_90a only and are dispatched after a
# runtime check of the device's compute capability. cudart is linked statically, cuBLAS/cuBLASLt
# dynamically (they come with the CUDA toolkit of the GPU machine), cuDNN is dlopen'ed at run
# time (libcudnn.so.9 from the library path, or the nvidia-cudnn wheel: see gpu_check.sh), so a
# binary starts and reports a clear error where cuDNN or the GPU is missing.
set(DITMOE_CUDA AUTO CACHE STRING "CUDA backend: AUTO (when nvcc is found), ON or OFF")
set_property(CACHE DITMOE_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${DITMOE_CUDA}" _dm_cuda_mode)

set(DITMOE_HAVE_CUDA OFF)
if(NOT _dm_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90)
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(DITMOE_HAVE_CUDA ON)
  elseif(_dm_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "DITMOE_CUDA=ON but no CUDA compiler was found (set CUDACXX or put nvcc on the PATH)")
  else()
    message(STATUS "CUDA backend: off (no nvcc found; DITMOE_CUDA=AUTO)")
  endif()
endif()

# Attach the backend to the library objects `target` and the libraries ARGN made from them
# (called from CMakeLists.txt after add_library).
function(ditmoe_cuda_attach target)
  if(NOT DITMOE_HAVE_CUDA)
    return()
  endif()
  set(_cu_flags -O3 -lineinfo -Werror all-warnings -Xptxas -warn-spills
      -Xcompiler=-Wall,-Wextra)
  file(GLOB _cu_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/backend/cuda/*.cu)
  file(GLOB _cu_sm90a CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/backend/cuda/*.sm90a.cu)
  if(_cu_sm90a)
    list(REMOVE_ITEM _cu_sources ${_cu_sm90a})
  endif()
  file(GLOB _c_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/backend/cuda/*.c)

  add_library(ditmoe_cuda_kernels OBJECT ${_cu_sources})
  add_library(ditmoe_cuda_sm90a OBJECT ${_cu_sm90a})
  set_target_properties(ditmoe_cuda_sm90a PROPERTIES CUDA_ARCHITECTURES 90a-real)
  foreach(t ditmoe_cuda_kernels ditmoe_cuda_sm90a)
    # The directory's compile options (-Wall, -march=native, -fsanitize...) are for the C
    # compiler; nvcc gets its own list.
    set_target_properties(${t} PROPERTIES COMPILE_OPTIONS "" CUDA_STANDARD 17
                          CUDA_STANDARD_REQUIRED ON POSITION_INDEPENDENT_CODE ON)
    target_compile_options(${t} PRIVATE ${_cu_flags})
    target_include_directories(${t} PRIVATE ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/src)
  endforeach()

  # The host C joins `target` (an object library); the device objects join each library built
  # from it (ARGN: the static and the shared library).
  target_sources(${target} PRIVATE ${_c_sources})
  foreach(lib ${ARGN})
    target_sources(${lib} PRIVATE $<TARGET_OBJECTS:ditmoe_cuda_kernels>
                   $<TARGET_OBJECTS:ditmoe_cuda_sm90a>)
  endforeach()
  # Host C of the backend: warnings are errors (the CUDA CI gate of issue 12).
  set_source_files_properties(${_c_sources} PROPERTIES COMPILE_OPTIONS "-Werror;-pedantic")
  target_include_directories(${target} PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_definitions(${target} PUBLIC DITMOE_HAVE_CUDA)
  target_link_libraries(${target} PUBLIC CUDA::cudart_static CUDA::cublasLt CUDA::cublas
                        ${CMAKE_DL_LIBS} stdc++)
  message(STATUS "CUDA backend: on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures "
                 "${CMAKE_CUDA_ARCHITECTURES} + sm_90a objects; cuDNN dlopen'ed at run time)")
endfunction()

# Test properties (called from tests/CMakeLists.txt: set_tests_properties only sees tests of the
# directory it runs in). CUDA tests exit 77 where there is no usable device -> ctest "Skipped".
function(ditmoe_cuda_tests)
  file(GLOB _cuda_tests CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/test_cuda_*.c)
  foreach(src ${_cuda_tests})
    get_filename_component(name ${src} NAME_WE)
    if(TEST ${name})
      set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77)
    endif()
  endforeach()
endfunction()

# The device-side check program of scripts/gpu_check.sh (src/backend/cuda/check/).
function(ditmoe_cuda_programs)
  if(NOT DITMOE_HAVE_CUDA)
    return()
  endif()
  add_executable(ditmoe-cuda-check ${PROJECT_SOURCE_DIR}/src/backend/cuda/check/ditmoe-cuda-check.c)
  target_include_directories(ditmoe-cuda-check PRIVATE ${PROJECT_SOURCE_DIR}/src ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(ditmoe-cuda-check PRIVATE -Werror -pedantic)
  target_link_libraries(ditmoe-cuda-check PRIVATE ditmoe)
endfunction()
