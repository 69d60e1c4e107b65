"""comodal: continual multimodal learning on streams of modality-pair tasks.

The names for extending comodal are importable from here: ``register_strategy`` with
``Strategy``, and ``register_dataset`` with ``DatasetSpec``, ``Splits`` and
``MultimodalDataset``. They load on first use, so that ``import comodal.config`` stays light.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "register_strategy": "comodal.strategies.registry",
    "Strategy": "comodal.strategies.base",
    "register_dataset": "comodal.scenarios.registry",
    "DatasetSpec": "comodal.scenarios.registry",
    "Splits": "comodal.scenarios.registry",
    "MultimodalDataset": "comodal.core.data",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """The public names above, imported from their modules when first asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'comodal' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
