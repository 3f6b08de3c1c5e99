"""What is running: the package's version, and the machine (for benchmark and evaluation reports)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def machine() -> dict[str, Any]:
    """What ran it: CPU, cores, torch threads, library versions, date."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    import torch
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "llama_index_lag": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
