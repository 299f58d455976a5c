"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: `memgen eval` with the arguments given, as a
user would launch it (`torchrun ... -m memgen.cli eval ...`); the command sets up the process group itself."""

import os
import sys

import torch

from memgen.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # (see worker_exit: torch's distributed state has aborted workers at finalization)
