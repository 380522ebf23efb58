"""fastft benchmarks: one ``bench_<op>.py`` per op on top of the shared ``harness``.

Run one op: ``python -m benchmarks.bench_cross_entropy --help``; every registered op:
``python -m benchmarks.run_ops`` (``make bench``). Results land in ``benchmarks/out/`` (``make bench-save``:
``benchmarks/results/``). ``make demo``'s kernels-on/off training comparison is ``benchmarks/demo.py``; the
runtime's own measurements are ``benchmarks/runtime_measure.py``.
"""
