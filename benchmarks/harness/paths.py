"""Where the benchmarks and their results live."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "benchmarks" / "out"  # generated results (git-ignored)
RESULTS_DIR = ROOT / "benchmarks" / "results"  # committed reference results (make bench-save)
