"""Stacked parameters: experts of one pool whose parameters have the same names, shapes and dtypes keep
them in shared buffers, one row per expert, so that work every owner does after every step (its
parameter commitment, experts/commitments.py) is a few batched ops for all of them instead of a few
per expert (eager ops cost ~4 µs each: on small experts that overhead is the cost).

Each expert's parameters stay its own `nn.Parameter`s, now views of its row: its owner's optimizer
steps them, `load_state_dict` copies into them, and nothing else changes. Code that swaps a
parameter's storage (`.to()` to another device, `param.data = ...`) breaks the view; `holds` sees it,
and that owner falls back to its own sketch.

Legend: G experts in a stack, P parameter tensors × K² sketch values.
"""

from __future__ import annotations

import torch
from torch import nn

from experts.commitments import stacked_sketch_GP


class ParameterStack:
    """The parameters of `modules` (all with one layout: names, shapes, dtypes, devices) as rows of one
    buffer per parameter name."""

    def __init__(self, modules: list[nn.Module]):
        layouts = {layout(module) for module in modules}
        if len(layouts) != 1:
            raise ValueError(f"modules to stack must share one parameter layout, got {len(layouts)}")
        self.names = sorted(name for name, _ in modules[0].named_parameters())
        with torch.no_grad():
            self.buffers = [
                torch.stack([module.get_parameter(name).detach() for module in modules])
                for name in self.names
            ]
        self._params = [[module.get_parameter(name) for name in self.names] for module in modules]
        for row, params in enumerate(self._params):
            for param, buffer in zip(params, self.buffers, strict=True):
                param.data = buffer[row]
        self._pointers = [[buffer[row].data_ptr() for buffer in self.buffers] for row in range(len(modules))]

    def holds(self, row: int) -> bool:
        """Whether the parameters stacked in row `row` are still views of it."""
        return [param.data_ptr() for param in self._params[row]] == self._pointers[row]

    def sketches_GP(self) -> torch.Tensor:
        """Every row's `param_sketch_P` (on the host), in two batched matmuls per parameter name."""
        return stacked_sketch_GP(self.buffers)


def layout(module: nn.Module) -> tuple:
    """What must match for modules to share a stack: each parameter's name, shape, dtype and device."""
    return tuple(
        sorted((name, tuple(p.shape), p.dtype, str(p.device)) for name, p in module.named_parameters())
    )


def stack_parameters(modules: list[nn.Module]) -> list[tuple[ParameterStack, int] | None]:
    """Stack the parameters of each group of `modules` that share a layout (two or more, with any
    parameters); returns each module's (stack, row), None for a module left alone."""
    groups: dict[tuple, list[int]] = {}
    for index, module in enumerate(modules):
        groups.setdefault(layout(module), []).append(index)
    placed: list[tuple[ParameterStack, int] | None] = [None] * len(modules)
    for key, members in groups.items():
        if len(members) < 2 or not key:
            continue
        stack = ParameterStack([modules[i] for i in members])
        for row, index in enumerate(members):
            placed[index] = (stack, row)
    return placed
