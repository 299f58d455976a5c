"""Training step: memgen batched forward + backward against the row-by-row reference.

Run: pytest benchmarks/test_bench_train.py --benchmark-json=OUT.json && python benchmarks/report.py OUT.json
(cases and implementations: memgen/bench/train_suite.py; workload: see benchmarks/bench_support.py).
"""

import pytest
from bench_support import parameters, run


@pytest.mark.parametrize("name,impl", parameters("train"))
def test_train(benchmark, name, impl):
    run(benchmark, "train", name, impl)
