"""Numba CUDA kernels; each module builds kernels from a frozen spec (nbflash.spec)."""
