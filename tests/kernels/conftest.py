"""Kernel tests run on the GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined (Triton decides
compile vs interpret at decoration time), i.e. before tokenfleet.kernels modules are imported.
Interpreter caveat: it converts float32 -> bfloat16 by truncation, not round-to-nearest as
the GPU does, so bf16 results carry up to one extra ulp; tolerances allow for it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["test_*.py"]
