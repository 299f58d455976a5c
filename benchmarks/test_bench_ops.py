"""Compiled ops: every op family on every backend here, batch 1 and 64.

Run: pytest benchmarks/test_bench_ops.py --benchmark-json=OUT.json && python benchmarks/report.py OUT.json
(cases and implementations: memgen/bench/ops_suite.py; workload: see benchmarks/bench_support.py).
"""

import pytest
from bench_support import parameters, run


@pytest.mark.parametrize("name,impl", parameters("ops"))
def test_ops(benchmark, name, impl):
    run(benchmark, "ops", name, impl)
