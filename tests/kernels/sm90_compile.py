"""Ahead-of-time compile of fastft's Triton kernels for a GPU that is not here (sm_90 by default), for tests and
for the register / shared-memory / vector-load figures of the low-rank and row kernels.

Triton decides at decoration time whether ``@triton.jit`` builds an interpreted function, so the compile runs in a
child process with TRITON_INTERPRET unset (``compile_kernels``); the child imports the kernel by module and name,
compiles it with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reports, per kernel:
the TTIR and PTX text, registers / spills (``cuobjdump -res-usage`` on the cubin), static + dynamic shared memory,
and its global loads by width (16-byte ``ld.global...v4.b32``-class vs narrower).

A kernel spec is ``(module, name, args, options)``: ``args`` maps every parameter name to a Triton type string
("*bf16", "i32", "fp32", ...; a pointer is marked 16-byte divisible as the JIT marks torch tensors, an "i32:16"
int as divisible by 16 as the JIT specialises such values) or, for a constexpr, its value; ``options`` holds
num_warps / num_stages. Run as a script it prints the table for the kernels of LOWRANK_SPECS:

    python tests/kernels/sm90_compile.py [arch]
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
SM90_REGISTERS_PER_SM = 65536
SM90_SHARED_PER_SM = 228 * 1024
SM90_THREADS_PER_SM = 2048
SM90_BLOCKS_PER_SM = 32

_TYPE = re.compile(r"^\*?(i|u|fp|bf)\d+(:16)?$")
_LOAD = re.compile(r"^\s*(?:@%p\d+\s+)?ld\.global(\.[a-z0-9.:]+)?\s", re.M)


def global_loads_by_width(ptx: str) -> dict:
    """{'v4': 16-byte loads, 'narrower': every other global load} counted in PTX text."""
    counts = {"v4": 0, "narrower": 0}
    for match in _LOAD.finditer(ptx):
        suffix = match.group(1) or ""
        if (".v4." in suffix + "." and (".b32" in suffix or ".f32" in suffix or ".u32" in suffix)) or \
                (".v2." in suffix + "." and (".b64" in suffix or ".u64" in suffix)):
            counts["v4"] += 1
        else:
            counts["narrower"] += 1
    return counts


def ctas_per_sm(registers: int, threads: int, shared_bytes: int) -> int:
    """Resident CTAs per sm_90 SM from registers (allocated per warp in 256-register units), threads, shared memory."""
    warps = threads // 32
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM90_REGISTERS_PER_SM // max(1, regs_per_warp * warps)
    by_threads = SM90_THREADS_PER_SM // threads
    by_shared = SM90_SHARED_PER_SM // shared_bytes if shared_bytes else SM90_BLOCKS_PER_SM
    return min(by_regs, by_threads, by_shared, SM90_BLOCKS_PER_SM)


def _compile_here(specs: list, arch: int) -> list:
    """In this process (TRITON_INTERPRET must be unset): compile each spec and measure it."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = []
    for spec in specs:
        module, name, args, options = spec[:4]
        fn = getattr(importlib.import_module(module), name)
        signature, constexprs, attrs = {}, {}, {}
        for index, arg in enumerate(fn.arg_names):
            value = args[arg]
            if isinstance(value, str) and _TYPE.match(value):
                kind, _, divisible = value.partition(":")
                signature[arg] = kind
                if kind.startswith("*") or divisible:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "constexpr"
                constexprs[arg] = value
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=dict(options))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        regs = int(re.search(r"REG:(\d+)", usage).group(1))
        spill = re.search(r"STACK:(\d+)", usage)
        static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
        shared = max(static_shared, int(compiled.metadata.shared))
        threads = 32 * options["num_warps"]
        loads = global_loads_by_width(compiled.asm["ptx"])
        results.append(dict(module=module, name=name, label=spec[4] if len(spec) > 4 else "", registers=regs, stack_bytes=int(spill.group(1)) if spill else 0,
                            shared_bytes=shared, threads=threads,
                            ctas_per_sm=ctas_per_sm(regs, threads, shared), v4_loads=loads["v4"],
                            narrower_loads=loads["narrower"], ttir=compiled.asm["ttir"], ptx=compiled.asm["ptx"]))
    return results


def compile_kernels(specs: list, arch: int = 90, timeout: float = 600) -> list:
    """Compile ``specs`` for sm_``arch`` in a child process (see the module docstring); a list of result dicts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import json, sys; sys.path.insert(0, %r); import sm90_compile as c; "
            "specs = json.load(sys.stdin); print(json.dumps(c._compile_here(specs, %d)))"
            % (os.path.dirname(os.path.abspath(__file__)), arch))
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(specs), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"sm_{arch} compile failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # this checkout's fastft
    import lowrank_specs

    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    print(f"{'kernel':<42} {'regs':>4} {'stack':>5} {'smem':>7} {'thr':>4} {'CTA/SM':>6} {'v4 ld':>5} {'narrow':>6}")
    for r in compile_kernels(lowrank_specs.production_specs(), arch):
        print(f"{r['name'] + ' ' + r.get('label', ''):<42} {r['registers']:>4} {r['stack_bytes']:>5} "
              f"{r['shared_bytes']:>7} {r['threads']:>4} {r['ctas_per_sm']:>6} {r['v4_loads']:>5} "
              f"{r['narrower_loads']:>6}")
