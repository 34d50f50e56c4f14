"""Triton kernels for the FP8 MoE path; each launcher sits next to its kernel, and
`kernels/reference.py` holds the pure-torch reference of every one."""
