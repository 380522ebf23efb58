"""The static GPU tier (``make gpu-static``): every Triton and CUDA-extension kernel compiled for sm_90 and sm_80
at its production launch configurations, without a GPU; registers, spills, shared memory, occupancy and
16-byte loads checked against per-kernel floors (floors.py); plus the per-op memory and traffic plan
(memory_plan.py). ``python -m benchmarks.gpu_static`` writes benchmarks/results/gpu_static.md."""
