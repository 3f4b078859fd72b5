"""Run by tests/test_data.py under `torchrun --nproc_per_node 2`: scripts/extract_codes.py, with
process 1 failing (`error`: an OSError) or killed (`kill`: SIGKILL) as it is about to write its
second shard.

    torchrun --nproc_per_node 2 tests/two_process_extraction.py error|kill <extract_codes.yaml overrides...>
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from arpg.data import ShardWriter


def main() -> None:
    failure, overrides = sys.argv[1], sys.argv[2:]
    original = ShardWriter.save_shard
    saved: list[int] = []

    def save_shard(self, index, *args, **kwargs):
        if os.environ["RANK"] == "1" and len(saved) == 1:
            if failure == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(f"simulated failure before writing shard {index}")
        saved.append(index)
        return original(self, index, *args, **kwargs)

    ShardWriter.save_shard = save_shard
    script = Path(__file__).resolve().parent.parent / "scripts" / "extract_codes.py"
    sys.argv = [str(script), *overrides]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
