"""What FSDP2 changes about a module that fastft looks at: ``fully_shard`` swaps in a subclass
``FSDP<Name>`` of the module's own class."""
from __future__ import annotations

from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP2
    FSDPModule = None


def unsharded_class(module: nn.Module) -> type:
    """The module's own class: under FSDP2, the first class of its MRO that is not an FSDPModule."""
    cls = type(module)
    if FSDPModule is None or not isinstance(module, FSDPModule):
        return cls
    return next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
