"""The CPU's name, for the header line every benchmark prints (no torch import: the tokenizer
benchmark runs without it)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The model name from /proc/cpuinfo, or what `platform` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
