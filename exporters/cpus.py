"""How many cores this process may really use, for every thread-count default (ORT, decode pools).

os.cpu_count() sees the whole node, and ONNX Runtime's own default (intra_op_num_threads=0) starts a
pool thread per physical core and pins each one to its core, past taskset and cpusets: under
`taskset -c 0` on 2 cores its calls burn 2.0 CPU-seconds per second. Counting cores here and
passing the count explicitly keeps a process inside the cores it was given.
"""
from __future__ import annotations

import os
from pathlib import Path


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets), capped by a cgroup v2 CPU
    quota (a k8s `limits.cpu`), rounded up. A pod limited to 2 cores on a 64-core node gets 2."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
