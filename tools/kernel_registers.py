"""Registers and spills of the Triton kernels the FP8 quantizers launch, compiled for Hopper on any
machine (no GPU needed): ptxas's resource report for each launch.

    python tools/kernel_registers.py [--only weight,rows,act,grouped] [--arch 90]

Each case calls a kernel entry point on small CPU tensors with Triton's launch captured instead
of run (the launcher picks its block shapes, warps and constexprs as on a GPU), compiles every
captured launch for sm_<arch> with the ptxas Triton ships, and prints one line per launch:
kernel, warps, registers a thread, spill bytes (stores + loads), constexprs. Statistics on and off
(`stats`: kernels/fp8_stats.py) are both listed, since counting adds registers. A spill is local
memory traffic inside the kernel: the line to read before timing a change on a GPU. Run it
without TRITON_INTERPRET (interpreted kernels compile to nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

if __package__ in (None, ""):  # run as a script: make `kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
            torch.int64: "*i64", torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8", torch.int8: "*i8",
            torch.bool: "*i1"}  # fmt: skip


@contextlib.contextmanager
def captured_launches() -> Iterator[list[tuple[JITFunction, tuple, dict]]]:
    """Inside: `kernel[grid](...)` records (kernel, args, kwargs) and runs nothing."""
    launches: list[tuple[JITFunction, tuple, dict]] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Triton's (signature, constexprs) of one captured launch."""
    bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    sig, consts = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = bound.get(name, param.default)
        if i in fn.constexprs or v is None:
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _POINTER[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__} has no Triton type here")
    return sig, consts


def resources(fn: JITFunction, args: tuple, kwargs: dict, arch: int) -> dict:
    """Compile one launch for sm_<arch>; ptxas -v's registers and spill bytes."""
    from triton.backends.nvidia.compiler import get_ptxas

    sig, consts = _signature(fn, args, kwargs)
    warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(ptx) + ".o"],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    named = {fn.arg_names[i[0]]: v for i, v in consts.items() if isinstance(v, (bool, int))}
    return dict(kernel=fn.__name__, warps=warps, registers=int(re.search(r"Used (\d+) registers", out).group(1)),
                spill_bytes=sum(spills), constexprs=named)  # fmt: skip


def _cases() -> dict[str, Callable[[torch.Tensor | None, torch.Tensor | None], None]]:
    """name -> a call of entry points on CPU tensors at Mixtral-like widths (stats1, stats2: one-
    and two-operand statistics buffers, or None)."""
    from kernels.act_quant import triton_act_quant_fwd
    from kernels.quantize import triton_quantize_rows
    from kernels.quantize_grouped import triton_quantize_rows_and_cols_grouped
    from kernels.quantize_weight import triton_quantize_weight

    w = torch.randn(2, 512, 256)
    x = torch.randn(1024, 512, dtype=torch.bfloat16)
    h = torch.randn(1024, 2 * 384, dtype=torch.bfloat16)
    ends = torch.tensor([300, 512, 1024], dtype=torch.int32)
    return {
        "weight": lambda s1, s2: [triton_quantize_weight(w, m, False, True, s1) for m in ("rowwise", "blockwise")],
        "rows": lambda s1, s2: [triton_quantize_rows(x, b, False, None, s1) for b in (0, 128)],
        "act": lambda s1, s2: [triton_act_quant_fwd(h, "swiglu", b, False, True, s2) for b in (0, 128)],
        "grouped": lambda s1, s2: [triton_quantize_rows_and_cols_grouped(x, ends, 128, b, False, None, s1)
                                   for b in (0, 128)],  # fmt: skip
    }


def main(argv: Sequence[str] | None = None) -> int:
    from kernels.fp8_stats import new_stats

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cases = _cases()
    parser.add_argument("--only", default=",".join(cases), help=f"comma-separated, of {list(cases)}")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, as ptxas's sm_<arch>a")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the kernels are interpreted, there is nothing to compile; unset it")
    unknown = sorted(set(args.only.split(",")) - set(cases))
    if unknown:
        parser.error(f"--only: unknown case(s) {unknown}; choose from {list(cases)}")
    print(f"triton {triton.__version__}, sm_{args.arch}a")
    print(f"{'case':8} {'stats':5} {'kernel':24} {'warps':>5} {'regs':>5} {'spill B':>8}  constexprs")
    for name in args.only.split(","):
        for stats in (False, True):
            with captured_launches() as launches:
                cases[name](new_stats(1, "cpu") if stats else None, new_stats(2, "cpu") if stats else None)
            for launch in launches:
                r = resources(*launch, args.arch)
                print(f"{name:8} {'on' if stats else 'off':5} {r['kernel']:24} {r['warps']:>5} {r['registers']:>5} "
                      f"{r['spill_bytes']:>8}  {r['constexprs']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
