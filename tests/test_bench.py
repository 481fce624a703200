"""bench.py's measurement at reproduce.py's shapes runs its real code paths end to end (train.py
alone, ensemble.py, sampling) at the smoke profile's size: each printed rate is positive and
finite, and the two training paths never write into each other's folders."""
import math
import re

import bench


def test_bench_reproduce_runs_both_training_paths_and_prints_rates(capsys):
    cfg = bench.BenchConfig(reproduce="smoke", reproduce_steps=4, reproduce_threads=1)
    bench.bench_reproduce(cfg, bench.resolve_device("cpu"), "cpu")
    out = capsys.readouterr().out
    rates = [float(x) for x in re.findall(r": ([0-9.]+) img/s", out)]
    assert len(re.findall(r"train alone \(train\.py\)", out)) == 2  # both smoke sizes
    assert len(re.findall(r"train ensemble of 2", out)) == 2
    assert rates and all(r > 0 and math.isfinite(r) for r in rates)
