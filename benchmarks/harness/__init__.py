"""Shared benchmark harness: every provider of one op side by side, in one run.

Modules by concern: providers (what a benchmark declares), check (outputs against the reference), timing,
memory, runner (subprocess per provider, or interleaved), report (table, files, plots), duration (expected
run time), cli (``main``). This package re-exports what the bench modules and tests use.

A benchmark module ``benchmarks/bench_<op>.py`` defines

    add_arguments(parser)            its own options (shapes, dtype, ...)
    config_from_args(args, device)   -> a JSON-serialisable dict (``device`` and ``quick`` included)
    build(config) -> Benchmark       the providers and the work per step for that config

and ends with ``if __name__ == "__main__": sys.exit(harness.main(sys.modules[__name__]))``.
``build`` must be deterministic in ``config``: each provider is re-built from it in a fresh
subprocess.

Per provider (in a FRESH subprocess unless ``--inprocess``: one provider's allocations, threads and
caches cannot colour another's numbers, and its peak memory is its own):
  1. ``setup()`` builds the inputs; the first ``step()`` is timed alone ("1st call": it holds
     torch.compile / Triton JIT / autotuning, which are excluded from the timed steps).
  2. Its outputs (a sample of rows of each) are checked against the ``reference`` provider's. One
     that disagrees is reported MISMATCH and never timed, so a broken kernel cannot win.
  3. ``warmup`` steps, then ``repeats`` timed steps reported as median / p20 / p80 ms, then the
     peak memory over ``mem_steps`` more steps. CUDA: CUDA events around each step, an L2 flush before
     each (as triton.testing.do_bench does); CPU: time.perf_counter.
Ratios are ``baseline median / provider median`` (> 1: faster than the baseline), measured in the
same run on the same inputs. ``--interleave ROUNDS`` instead runs every provider in one process, one
step each per round, and reports per-round paired ``provider / baseline`` time ratios (see interleaved()):
the measurement to quote on a CPU shared with other jobs.

Results: ``<out-dir>/<op>_<device>[_<tag>].{csv,json,md,png}``. The default ``--out-dir`` is
benchmarks/out/ (ignored by git), so a run never touches the committed reference results in
benchmarks/results/; those are rewritten only on purpose (``make bench-save``, i.e.
``--out-dir benchmarks/results``), from a quiet machine.
"""
from .check import check_agreement, compare
from .cli import main, parser_for
from .duration import PROCESS_OVERHEAD_S, expected_duration_text, reference_seconds
from .paths import OUT_DIR, RESULTS_DIR, ROOT
from .providers import (Benchmark, Options, Provider, fastft_backend_provider, liger_provider, low_precision,
                        op_benchmark, torch_compile_provider, unavailable)
from .report import emit_text_report, loss_time_memory_table, machine_line, markdown, metadata, plot, redraw, save, table
from .runner import interleaved, run, run_provider
from .timing import interleave, quantile

__all__ = ["Benchmark", "OUT_DIR", "Options", "PROCESS_OVERHEAD_S", "Provider", "RESULTS_DIR", "ROOT",
           "check_agreement", "compare", "emit_text_report", "expected_duration_text", "loss_time_memory_table", "fastft_backend_provider", "interleave",
           "interleaved", "liger_provider", "low_precision", "machine_line", "main", "markdown", "metadata",
           "op_benchmark", "parser_for", "plot", "quantile", "redraw", "reference_seconds", "run",
           "run_provider", "save", "table", "torch_compile_provider", "unavailable"]
