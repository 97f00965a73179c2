# pyconcepts._C_cuda: the CUDA kernels. Included by CMakeLists.txt after
# enable_language(CUDA). Links the CUDA runtime statically and never libtorch: torch hands
# over device pointers and its current stream as plain integers (see pyconcepts/ops.py).
find_package(CUDAToolkit REQUIRED)

pybind11_add_module(_C_cuda
  ${CMAKE_CURRENT_LIST_DIR}/bindings.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cosine_assign.cu
  ${CMAKE_CURRENT_LIST_DIR}/spherical_update.cu
  ${CMAKE_CURRENT_LIST_DIR}/masked_moments.cu
)
target_include_directories(_C_cuda PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
target_compile_definitions(_C_cuda PRIVATE PYCONCEPTS_WITH_CUDA)
set_target_properties(_C_cuda PROPERTIES
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_RUNTIME_LIBRARY Static
  CUDA_SEPARABLE_COMPILATION OFF
)
target_compile_options(_C_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CXX>:-O3 -Wall -Wextra>
  # -lineinfo keeps profiler source mapping at no run-time cost; spills are reported so a
  # register-hungry change to the tensor-core kernel is seen at build time.
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo -Xptxas=-warn-spills -Xcompiler=-Wall>
)
target_link_libraries(_C_cuda PRIVATE CUDA::cudart_static)
install(TARGETS _C_cuda LIBRARY DESTINATION .)
