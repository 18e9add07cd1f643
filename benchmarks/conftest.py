"""Benchmarks run on the GPU when there is one; CPU shapes otherwise. Triton's interpreter is never timed."""
