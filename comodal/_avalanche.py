"""The Avalanche names comodal uses, imported in one place.

Avalanche 0.6 imports qpsolvers, which warns at import when no QP solver is installed (only
its GEM plugin needs one); the warning is silenced here rather than at every import site.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from avalanche.benchmarks import CLScenario, DatasetExperience, EagerCLStream
    from avalanche.benchmarks.utils import ConstantSequence, DataAttribute, TaskLabels
    from avalanche.benchmarks.utils.classification_dataset import (
        TaskAwareSupervisedClassificationDataset,
    )
    from avalanche.core import BasePlugin, BaseSGDPlugin, SupervisedPlugin
    from avalanche.training.plugins.clock import Clock

__all__ = [
    "BasePlugin", "BaseSGDPlugin", "CLScenario", "Clock", "ConstantSequence", "DataAttribute",
    "DatasetExperience", "EagerCLStream", "SupervisedPlugin",
    "TaskAwareSupervisedClassificationDataset", "TaskLabels",
]
