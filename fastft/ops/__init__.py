"""Public functionals, one per op (one module each). Each validates its input, picks this op's backend
and calls its op defined through fastft.ops._define (the registered ``torch.ops.fastft.*`` op under
torch.compile, its eager twin otherwise). ``fastft.ops.registry`` lists them all.

Importing every public module of this package registers its op; the functionals are then exported
under their registry names, so adding an op does not touch this file.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from . import registry

for _module_info in _pkgutil.iter_modules(__path__):
    if not _module_info.name.startswith("_"):
        _importlib.import_module(f".{_module_info.name}", __name__)
del _module_info

globals().update({entry.name: entry.functional for entry in registry.entries()})
__all__ = sorted(["registry", *(entry.name for entry in registry.entries())])
