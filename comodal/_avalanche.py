"""The Avalanche names comodal uses, imported in one place.

Avalanche 0.6's imports warn (qpsolvers without a solver, deprecations); the warnings are
silenced here rather than at every import site.
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
    from avalanche.evaluation.metrics import ExperienceForgetting, StreamForgetting
    from avalanche.evaluation.metrics.accuracy import AccuracyPluginMetric
    from avalanche.training.plugins import (
        EarlyStoppingPlugin,
        EvaluationPlugin,
        GDumbPlugin,
        LRSchedulerPlugin,
        LwFPlugin,
        ReplayPlugin,
        SynapticIntelligencePlugin,
    )
    from avalanche.training.plugins.clock import Clock

__all__ = [
    "AccuracyPluginMetric", "BasePlugin", "BaseSGDPlugin", "CLScenario", "Clock",
    "ConstantSequence", "DataAttribute", "DatasetExperience", "EagerCLStream",
    "EarlyStoppingPlugin", "EvaluationPlugin", "ExperienceForgetting", "GDumbPlugin",
    "LRSchedulerPlugin", "LwFPlugin", "ReplayPlugin", "StreamForgetting", "SupervisedPlugin",
    "SynapticIntelligencePlugin", "TaskAwareSupervisedClassificationDataset", "TaskLabels",
]
