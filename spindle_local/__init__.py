"""spindle-local: GGUF models on a patched llama.cpp with a SpindleKV-compressed KV cache."""

__version__ = "0.1.0"
