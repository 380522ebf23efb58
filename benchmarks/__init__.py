"""fastft benchmarks: one ``bench_<op>.py`` per op on top of the shared ``harness``.

Run one op: ``python -m benchmarks.bench_cross_entropy --help``; every registered op:
``python -m benchmarks.run_demo`` (``make demo``). Results land in ``benchmarks/results/``.
"""
