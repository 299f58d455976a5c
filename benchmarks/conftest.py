"""Benchmarks reuse the tests' offline building blocks (tokenizer trained on a small corpus, tiny models)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
