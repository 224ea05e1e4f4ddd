"""What a computation costs: its FLOPs, and the peak bytes of the tensors it holds at once.

FLOPs are counted by ``torch.utils.flop_counter`` with grouped convolutions counted right. torch's counter (2.13) charges the weight gradient of a convolution as if it were dense: for the
official LQAE block's depthwise 3x3 convolution over 3,072 channels that is 3,072 times too much,
which made the paper-scale step with the official block look like 1,547 GFLOP per image (an
impossible 80% MFU). Here every part of a convolution's backward costs what its forward costs,
which holds for any ``groups``: the input gradient and the weight gradient each multiply the same
pairs of numbers as the forward pass. Its attention count also covers the CPU's fused attention
kernel, which torch's table lacks, so that CPU and GPU counts agree.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _convolution_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    # The forward's count uses the weight's (out, in / groups) channels, so it is right for any groups.
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: The formulas that replace or complete torch's table.
FLOP_FORMULAS = {
    aten.convolution_backward: _convolution_backward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flop,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (a multiply-add is 2) of calling ``fn()``: matmuls, convolutions, attention.

    Parameters
    ----------
    fn : callable
        Called once with no arguments, e.g. a forward and backward pass.

    Returns
    -------
    int
        The operations counted.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.training._accounting import count_flops
    >>> a, b = torch.rand(8, 16), torch.rand(16, 4)
    >>> count_flops(lambda: a @ b)
    1024
    """
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        fn()
    return counter.get_total_flops()


class TensorMemoryPeak(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among those created inside the ``with`` block.

    Every new storage an operator returns is counted from its creation until it is freed
    (views and tensors autograd saves keep it alive, as they keep the memory). It works on
    any device, the CPU included, where torch keeps no allocator statistics. Not counted:
    storages that existed before the block (and views of them), and scratch memory a kernel
    allocates and frees inside itself.

    Attributes
    ----------
    peak : int
        The largest number of bytes alive at once so far.
    live : int
        The bytes alive now.

    Examples
    --------
    >>> import torch
    >>> from lqae_sklearn.training._accounting import TensorMemoryPeak
    >>> with TensorMemoryPeak() as memory:
    ...     a = torch.ones(1000)  # 4,000 bytes
    ...     b = (a * 2).sum()
    ...     del a
    >>> memory.peak
    8004
    """

    def __init__(self):
        super().__init__()
        self.peak = 0
        self.live = 0
        self._alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: not new memory.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata  # the C++ storage; its Python object lives exactly as long
                if key not in self._alive and key not in inputs:
                    self._alive.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out
