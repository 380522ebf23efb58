"""Global-memory loads of a kernel, counted from its PTX or SASS text: 16-byte vector loads
(ld.global.v4.b32 / .v2.b64 / .v8.b16 in PTX, LDG.E.128 in SASS) against narrower ones. The count is static
(instructions in the code, not executions), which is what tells whether the compiler could vectorise."""
import re
from dataclasses import dataclass

__all__ = ["LoadCounts", "count_global_loads"]

# PTX: ld.global[.nc][.L1::evict_last ...][.v2|.v4|.v8].<type>   (width in bits from the type's digits)
_PTX_LOAD = re.compile(r"\bld\.global((?:\.[A-Za-z0-9_:]+)*?)\.(?:(v[248])\.)?([bsuf])(\d+)\b")
# SASS: LDG.E[.modifiers][.64|.128|.U8|.S16 ...] (no size suffix: 32-bit)
_SASS_LOAD = re.compile(r"\bLDG(?:\.[A-Z0-9_]+)*")
_SASS_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


@dataclass(frozen=True)
class LoadCounts:
    vector16: int     # loads of 16 bytes per thread
    narrower: int     # every other global load (scalar or 4/8-byte vector)

    @property
    def total(self) -> int:
        return self.vector16 + self.narrower


def _count(bits_of_each) -> LoadCounts:
    wide = sum(1 for bits in bits_of_each if bits >= 128)
    return LoadCounts(wide, len(bits_of_each) - wide)


def count_global_loads(text: str) -> LoadCounts:
    """Counts the global loads of PTX (``ld.global``) or SASS (``LDG``) text; the format is told by the text."""
    if "ld.global" in text:
        bits = []
        for m in _PTX_LOAD.finditer(text):
            lanes = int(m.group(2)[1:]) if m.group(2) else 1
            bits.append(lanes * int(m.group(4)))
        return _count(bits)
    bits = []
    for m in _SASS_LOAD.finditer(text):
        suffixes = m.group(0).split(".")[1:]
        size = [_SASS_BITS[s] for s in suffixes if s in _SASS_BITS]
        bits.append(size[-1] if size else 32)
    return _count(bits)
