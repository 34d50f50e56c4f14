"""Triton kernels for the FP8 MoE path. Each entry point sits next to its kernel and launcher
(`triton_x`); `torch_x`, its pure-torch reference, is in kernels/reference*.py; kernels/contracts.py
holds the argument checks both share, and kernels/dispatch.py the one choice between them."""
