"""One module per op: its declaration (fastft.ops._define.define_op: registered op, fake, autograd, the kernel set
of each backend, the reference), its public functional and its registry entry. The functionals are exported by
``fastft.ops`` (``fastft.ops.cross_entropy`` is the function; this package's ``cross_entropy`` is its module), so
no module here is shadowed by a function of the same name.

Importing this package imports every op module, which registers its op.
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _module_info in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f".{_module_info.name}", __name__)
del _module_info
