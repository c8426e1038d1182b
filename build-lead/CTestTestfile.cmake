# CMake generated Testfile for 
# Source directory: /work/main
# Build directory: /work/main/build-lead
# 
# This file includes the relevant testing commands required for 
# testing this directory and lists subdirectories to be tested as well.
include("/work/main/build-lead/test_attention[1]_include.cmake")
include("/work/main/build-lead/test_config[1]_include.cmake")
include("/work/main/build-lead/test_lsh[1]_include.cmake")
