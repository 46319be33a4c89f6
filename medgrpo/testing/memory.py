"""Peak extra memory of a block of PyTorch code, on CUDA and on CPU.

``with PeakMemory(device) as meter: ...`` then ``meter.peak_extra_bytes``: the most bytes
allocated inside the block and alive at the same time. What was live at entry is not
counted; everything allocated inside is, whatever allocates it: op outputs and views'
storages (once), autograd-saved tensors, gradients, and temporaries inside kernels, C++
extensions and composite ops. In-place ops and views allocate nothing, so add nothing.
``meter.end_extra_bytes`` is what of it is still allocated at exit (freeing lowers it, the
peak stays).

* CUDA: the caching allocator's counters: ``max_memory_allocated()`` minus
  ``memory_allocated()`` at entry, after ``reset_peak_memory_stats()``.
* CPU: torch's CPU allocator keeps no peak counter, but reports every allocation and free
  to the profiler. The block runs under ``torch.profiler.profile(profile_memory=True)``
  and the allocator's ``[memory]`` events, in time order, give the live total and its peak
  (frees of blocks allocated before the block are not reported, so they do not count).

Not counted on CPU: Python objects, and memory that does not come from torch's CPU
allocator (BLAS scratch buffers, an extension's malloc/new). Allocations made on threads
the profiler does not follow (a raw ``std::thread`` in an extension) are missed; the
calling thread, autograd's backward and intra-op worker threads are followed. Do not nest
it inside another torch profiler. Why not a ``TorchDispatchMode`` recording op outputs: an
active dispatch mode changes what some autograd formulas allocate (gather's backward, for
one, takes an out-of-place path "for tensor subclasses", one extra (M, V) buffer after a
full-logits log_softmax), and it cannot see temporaries inside kernels.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch.profiler import ProfilerActivity, profile


class PeakMemory:
    """Context manager measuring ``peak_extra_bytes`` (and ``end_extra_bytes``) of its block.

    ``device``: "cuda" / "cpu" (or a torch.device); default CUDA when available, else CPU.
    """

    def __init__(self, device: Union[str, torch.device, None] = None) -> None:
        kind = torch.device(device).type if device is not None else None
        self.device = kind or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"PeakMemory measures cpu or cuda, got {self.device}")
        self.peak_extra_bytes = 0
        self.end_extra_bytes = 0
        self._start = 0
        self._profiler: Optional[profile] = None

    @property
    def peak_extra_mib(self) -> float:
        return self.peak_extra_bytes / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_extra_bytes = torch.cuda.max_memory_allocated() - self._start
            self.end_extra_bytes = torch.cuda.memory_allocated() - self._start
            return
        assert self._profiler is not None
        self._profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        events = [
            e
            for e in self._profiler.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU
        ]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()  # > 0 an allocation, < 0 a free
            peak = max(peak, live)
        self.peak_extra_bytes, self.end_extra_bytes = peak, live
        self._profiler = None
