"""``python -m benchmarks.harness``: a provider's subprocess (``--child SPEC``), ``--redraw DIR`` and
``--expected-duration [cpu|cuda]`` (what `make bench` prints first)."""
import sys
from pathlib import Path

from .duration import expected_duration_text
from .report import redraw
from .runner import child_main

if len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.exit(child_main(sys.argv[2]))
if len(sys.argv) == 3 and sys.argv[1] == "--redraw":
    print("wrote " + ", ".join(str(p) for p in redraw(Path(sys.argv[2]))))
    sys.exit(0)
if len(sys.argv) >= 2 and sys.argv[1] == "--expected-duration":  # `make bench` prints this first
    if len(sys.argv) > 2:
        device_arg = sys.argv[2]
    else:
        import torch

        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    print(expected_duration_text(device_arg))
    sys.exit(0)
print("usage: python -m benchmarks.bench_<op> ... (benchmarks.harness is the shared library; it also takes "
      "--expected-duration [cpu|cuda] and --redraw DIR)", file=sys.stderr)
sys.exit(2)
