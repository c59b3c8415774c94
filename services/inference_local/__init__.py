"""inference-local: runs GGUF models in-process with llama.cpp (llama-cpp-python)."""
