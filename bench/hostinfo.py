"""Host-side helpers shared by the benchmark scripts (standard library only, so the
official-PyTorch workers, which run in another Python, can import it too)."""
from __future__ import annotations

import os
import platform


def pin_threads(threads, single_thread_xla: bool = True):
    """Restrict this process (and its children) to the first `threads` allowed CPUs;
    returns the CPU list (all allowed ones when `threads` is None). XLA's CPU client sizes
    its thread pool from this mask; with one thread, `single_thread_xla` also turns off
    Eigen's intra-op threads."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads is None:
        return allowed
    if threads < 1 or threads > len(allowed):
        raise SystemExit(f"--threads must be in 1..{len(allowed)} (allowed CPUs: {allowed})")
    cpus = allowed[:threads]
    os.sched_setaffinity(0, cpus)
    if threads == 1 and single_thread_xla:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    return cpus


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM: writing 5 to /proc/self/clear_refs) so
    that a phase's peak can be read on its own; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int | None:
    """Peak resident memory of this process since start or the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
