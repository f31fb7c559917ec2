"""``torch.compile`` for a generator's plain forward passes, with the MeanFlow JVP left eager.

Dynamo does not trace forward-mode dual tensors under the tangent-rule ``TorchFunctionMode`` that the graph-free
JVP (``meanflow.jvp``) runs in, so compiling the whole generator would graph-break or fail inside the JVP. The
other passes of a MeanFlow step (the forward that keeps its graph, the no-gradient forwards of the predicted
tangent and of training-time guidance) and every sampling step are plain forwards, and compile without a graph
break (DiT and U-Net; checked with ``torch._dynamo.explain``, see ``tests/test_compile.py``). ``CompiledForward``
sends each call to the compiled function or, inside the JVP (a ``TorchFunctionMode`` is active: the JVP modes of
``meanflow.tangent_rules``), to the module itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CompiledForward:
    """Callable like ``module``: compiled outside the JVP, eager inside it. Holds no parameters of its own."""

    def __init__(self, module: nn.Module, **compile_kwargs: Any):
        self.module = module
        self.compiled = torch.compile(module, **compile_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch._C._is_torch_function_mode_enabled():  # inside a JVP mode: dynamo does not trace dual tensors
            return self.module(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # .training, .parameters(), ... of the wrapped module
        return getattr(self.module, name)
