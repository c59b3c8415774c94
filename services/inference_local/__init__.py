"""inference-local: runs GGUF models in-process with llama.cpp (llama-cpp-python)."""

import ctypes
import os
import sys

# Between two decodes llama.cpp's OpenMP workers would spin for GOMP's default spin count (about
# a millisecond) before they sleep, taking the cores that sampling on the decode thread and the
# rest of the mesh need at every step; with every core given to llama.cpp that starved them.
# PASSIVE: idle workers sleep at once (ggml's barriers inside one decode still spin). Set before
# libgomp loads, which reads it once; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if sys.platform.startswith("linux"):
    # libstdc++ goes into the process's global symbol scope before llama.cpp loads. Otherwise,
    # once another extension (grpcio) has loaded libstdc++ privately, libllama binds some
    # std::ostream members to the copies a CUDA build of libggml-cuda carries, and the first
    # model load crashes in llama_model::print_info (SIGSEGV; seen with CUDA 13 on an H100).
    # By soname: the library libllama itself links, found without ctypes.util's ldconfig run.
    ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
