"""Tests import the flat top-level files; tiny models run fastest on one thread (and two torch
processes on a 2-core machine collapse each other's throughput)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# bench.py and mutate.py, the tools beside the library
sys.path.insert(1, os.path.join(ROOT, "tools"))
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses tests start
