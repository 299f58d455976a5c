"""Decoding: memgen with memory against vanilla decoding (its own engine, Hugging Face generate) and the reference.

Run: pytest benchmarks/test_bench_decode.py --benchmark-json=OUT.json && python benchmarks/report.py OUT.json
(cases and implementations: memgen/bench/decode_suite.py; workload: see benchmarks/bench_support.py).
"""

import pytest
from bench_support import parameters, run


@pytest.mark.parametrize("name,impl", parameters("decode"))
def test_decode(benchmark, name, impl):
    run(benchmark, "decode", name, impl)
