"""Public functionals, one per op: ``fastft.ops.<op>(...)``. Each validates its input, picks this op's backend and
runs its kernels or its reference (fastft.ops._define). The op modules are ``fastft.ops.defs.<op>``;
``fastft.ops.registry`` lists them all.

The functionals are exported under their registry names, so adding an op does not touch this file. Every public
attribute of this package is a function, except the submodules ``checks`` (argument checks), ``defs``
and ``registry``.
"""
from . import checks, defs, registry

globals().update({entry.name: entry.functional for entry in registry.entries()})
__all__ = sorted(["checks", "defs", "registry", *(entry.name for entry in registry.entries())])
