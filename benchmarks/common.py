"""What every benchmark's JSON ends with: the machine and versions, the command, the time."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


def write_results(path: Path, report: dict[str, Any], script: str, argv: list[str] | None, **versions: str) -> None:
    """Write `report` plus its provenance to `path` (`argv`: main's argument, None = sys.argv)."""
    full = {
        **report,
        "environment": {
            "torch": torch.__version__, **versions, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "command": " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
