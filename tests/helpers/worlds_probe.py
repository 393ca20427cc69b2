"""Run under torchrun by test_distributed_waits: rank 1 is slow (alive) or gone (dead)."""

import sys
import time

from ensemble.errors import EnsembleError
from ensemble.runtime.distributed import Worlds
from ensemble.runtime.launch_env import launch_info

mode = sys.argv[1]
worlds = Worlds(timeout_s=3)
rank = launch_info().rank
if rank == 1:
    if mode == "dead":
        import os

        os._exit(0)  # leaves without arriving and without an error the launcher would act on
    time.sleep(8)  # slow but alive: longer than the timeout
start = time.monotonic()
try:
    worlds.wait_all("probe")
    print(f"rank {rank} passed after {time.monotonic() - start:.1f}s", flush=True)
except EnsembleError as e:
    print(f"rank {rank} error after {time.monotonic() - start:.1f}s: {e}", flush=True)
worlds.close()
