"""torch.compile for `model.compile=true`: in place, and only where it can build its kernels.

The network is compiled with `nn.Module.compile()`, which compiles its `__call__` and leaves the module
as it is: the state dict keeps its `net.*` keys, so a checkpoint loads the same whether the run that
wrote it was compiled or not, and a run can be resumed with compile switched on or off.

On a CPU, TorchInductor writes C++ kernels and needs a C++ compiler (g++, or $CXX). Without one the first
training step would fail deep inside the compiler stack; instead the run trains uncompiled, with a
one-line warning.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("fer.models.compiling")


def cannot_compile(device: torch.device) -> str | None:
    """None when torch.compile can build kernels for `device`, else why not, in a few words."""
    if device.type != "cpu":
        return None  # GPU kernels come from Triton, which ships with torch
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()  # runs `<compiler> --version`; raises when none is found
    except Exception as exc:  # InvalidCxxCompiler, or an inductor without this helper
        return f"no C++ compiler for its CPU kernels ({type(exc).__name__}; install g++ or set CXX)"
    return None


def is_compiled(net: nn.Module) -> bool:
    return getattr(net, "_compiled_call_impl", None) is not None


def compile_in_place(net: nn.Module, device: torch.device) -> None:
    """Compiles `net` for `device` unless it is compiled already or cannot be (then with a one-line warning)."""
    if is_compiled(net):
        return
    reason = cannot_compile(device)
    if reason:
        log.warning("model.compile=true: %s; training uncompiled", reason)
        return
    net.compile()
