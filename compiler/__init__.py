"""Compiler: GGUF import, float reference, compression, packing and scheduling."""
