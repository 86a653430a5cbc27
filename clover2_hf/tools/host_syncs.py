"""Counting what a decoding loop would make an accelerator wait for, without one (issue 11's yardstick).

`OpCounter` counts every dispatched ATen op (a `TorchDispatchMode`) and the scalar reads among them
(`aten::_local_scalar_dense`: `.item()`, `int()`, `bool()`, `float()` of a tensor); `count_host_copies` counts
calls of `Tensor.tolist` / `.cpu` / `.numpy`. On an accelerator each scalar read and host copy waits for
the device; on a CPU nothing waits, so the counts say what a GPU step would pay, measured on any machine.
Not counted, though also syncs on a GPU: `torch.tensor(python_list, device=...)` from pageable memory and
explicit synchronisations. Used by `scripts/count_host_syncs.py` and tests/test_device_step.py.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_COPIES", "OpCounter", "count_host_copies", "counting"]

HOST_COPIES = ("tolist", "cpu", "numpy")


class OpCounter(TorchDispatchMode):
    """Counts dispatched ATen ops (all, and non-view) and scalar reads while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["ops"] += 1
        if not func.is_view:
            self.counts["ops_without_views"] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["scalar_reads"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_copies(counts: collections.Counter):
    """Counts calls of Tensor.tolist / .cpu / .numpy (restored on exit)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}

    def counted(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            counts["host_copies"] += 1
            return original(self, *args, **kwargs)

        return method

    for name in HOST_COPIES:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def counting():
    """Counts ops, scalar reads and host copies while active; yields the `Counter` (keys "ops",
    "ops_without_views", "scalar_reads", "host_copies")."""
    counter = OpCounter()
    with count_host_copies(counter.counts), counter:
        yield counter.counts
