"""Triton kernels, one module per op family. Importing this package imports triton; TRITON_INTERPRET must be set
before that (the kernels read it at import to collapse autotuning and upcast bf16 dot operands)."""
