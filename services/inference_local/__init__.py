"""inference-local: runs GGUF models in-process with llama.cpp (llama-cpp-python)."""

import ctypes
import sys

if sys.platform.startswith("linux"):
    # libstdc++ goes into the process's global symbol scope before llama.cpp loads. Otherwise,
    # once another extension (grpcio) has loaded libstdc++ privately, libllama binds some
    # std::ostream members to the copies a CUDA build of libggml-cuda carries, and the first
    # model load crashes in llama_model::print_info (SIGSEGV; seen with CUDA 13 on an H100).
    # By soname: the library libllama itself links, found without ctypes.util's ldconfig run.
    ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
