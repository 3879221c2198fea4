"""Peak memory per backend, without psutil.

Host: Linux keeps the process's peak resident set (``VmHWM`` in ``/proc/self/status``) and
lets the process reset it to the current RSS by writing ``5`` to ``/proc/self/clear_refs``;
resetting before a backend's work and reading after gives that backend's peak (which
includes whatever else is resident: the adapter, other backends' sessions; the RSS at the
reset is recorded beside it). Elsewhere ``resource.getrusage`` gives the process's
lifetime peak only, and the result says so.

Device: torch's allocator peak for torch backends, and the used memory the driver reports
(``cudaMemGetInfo``) for the others, which allocate outside torch.
"""

from __future__ import annotations

import resource
from typing import Any


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """``with PeakMemory() as m: work()`` then ``m.result()``."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.resettable = False
        self.rss_before: int | None = None
        self.peak: int | None = None
        self.device_peak: int | None = None

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        rss = _status_kib("VmRSS")
        self.rss_before = rss * 1024 if rss is not None else None
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._torch_base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM") if self.resettable else None
        if hwm is not None:
            self.peak = hwm * 1024
        else:  # ru_maxrss is KiB on Linux
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            self.device_peak = max(torch.cuda.max_memory_allocated(), total - free)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_rss_bytes": self.peak,
            "rss_at_start_bytes": self.rss_before,
            "peak_rss_method": "VmHWM after clear_refs reset"
            if self.resettable
            else "getrusage ru_maxrss (process lifetime)",
        }
        if self.cuda:
            out["device_peak_bytes"] = self.device_peak
        return out


def merge_peaks(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The larger of two peak records, field by field."""
    if a is None:
        return dict(b)
    out = dict(a)
    for key in ("peak_rss_bytes", "device_peak_bytes"):
        if b.get(key) is not None and (out.get(key) is None or b[key] > out[key]):
            out[key] = b[key]
            if key == "peak_rss_bytes":
                out["rss_at_start_bytes"] = b.get("rss_at_start_bytes")
    return out
