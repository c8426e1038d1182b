# CMake generated Testfile for 
# Source directory: /work/main
# Build directory: /work/main/build-lead
# 
# This file includes the relevant testing commands required for 
# testing this directory and lists subdirectories to be tested as well.
include("/work/main/build-lead/test_attention[1]_include.cmake")
include("/work/main/build-lead/test_checkpoint[1]_include.cmake")
include("/work/main/build-lead/test_config[1]_include.cmake")
include("/work/main/build-lead/test_data[1]_include.cmake")
include("/work/main/build-lead/test_lsh[1]_include.cmake")
include("/work/main/build-lead/test_model[1]_include.cmake")
include("/work/main/build-lead/test_ops_dense[1]_include.cmake")
include("/work/main/build-lead/test_ops_elementwise[1]_include.cmake")
include("/work/main/build-lead/test_ops_loss[1]_include.cmake")
include("/work/main/build-lead/test_ops_optim[1]_include.cmake")
