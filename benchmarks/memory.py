"""How many bytes autograd keeps for backward.

``saved_tensors_hooks`` sees every tensor a graph saves (ours through
``save_for_backward``, torch's through its own nodes). We count distinct
storages, leaving out the parameters and the input, which exist anyway: what
remains is the memory a layer costs between forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_bytes(step: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages saved while ``step()`` builds its graph, ``exclude`` left out."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())


def peak_cuda_bytes(step: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during ``step()``, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
