"""Deprecated name of :mod:`fastft.bottleneck` (bottleneck adapters).

Renamed because ``fastft.adapters.save_adapters`` / ``adapter_state_dict`` sat beside LoRA's
``fastft.lora.save_adapter`` / ``adapter_state_dict``. The old names still work here and warn once on import.
"""
import warnings

from . import bottleneck as _bottleneck
from .bottleneck import find_sites, trainable_report  # noqa: F401  (unchanged names)

warnings.warn(
    "fastft.adapters is deprecated: use fastft.bottleneck (apply_bottleneck_adapters, save_bottleneck_adapters, "
    "load_bottleneck_adapters, remove_bottleneck_adapters, bottleneck_state_dict, BottleneckConfig)",
    DeprecationWarning, stacklevel=2,
)

AdapterConfig = _bottleneck.BottleneckConfig
AdapterReport = _bottleneck.BottleneckReport
has_adapters = _bottleneck.has_bottleneck_adapters
apply_adapters = _bottleneck.apply_bottleneck_adapters
adapter_state_dict = _bottleneck.bottleneck_state_dict
remove_adapters = remove = _bottleneck.remove_bottleneck_adapters
save_adapters = _bottleneck.save_bottleneck_adapters
load_adapters = _bottleneck.load_bottleneck_adapters
