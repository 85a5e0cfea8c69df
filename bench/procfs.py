"""Memory figures from Linux's /proc, shared by the benchmarks (they measure, they do not estimate)."""

from __future__ import annotations


def kib_field(path: str, key: str) -> int:
    """Bytes of a ``KEY:  N kB`` line of ``path`` (/proc/self/status, /proc/meminfo); 0 when missing."""
    with open(path, encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """This process's resident size now (0 where /proc has no VmRSS)."""
    return kib_field("/proc/self/status", "VmRSS")


def available_bytes() -> int:
    """Memory the kernel says new work can use without swapping (0 where unknown)."""
    return kib_field("/proc/meminfo", "MemAvailable")
