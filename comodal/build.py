"""What a typed config names, checked and built: the layer between ``comodal.config`` (which
knows no registry) and a run.

``check`` imports the modules a config lists under ``imports`` (so that they can register
strategies and datasets) and then checks every name against the encoders, the dataset and
strategy registries and the plugin classes; ``build_plugins`` makes the ``plugins`` objects.
Runs and comparisons call ``check`` before anything is generated or trained.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from comodal.config import ModalityConfig, RunConfig, check_modality_name, validate
from comodal.errors import ComodalError, ConfigError
from comodal.platform import checkpoint
from comodal.platform.modalities import ENCODERS, check_encoder
from comodal.scenarios.registry import resolve_task
from comodal.strategies.registry import validate_strategies
from comodal.yaml_input import shown


def check(config: RunConfig) -> None:
    """Every check of ``config`` before a run: its ``imports`` first, then the modalities'
    encoders, ``validate``'s checks, each task's dataset and modalities, the strategy stack,
    and each plugin (its class imported and built with its ``args``)."""
    import_modules(config.imports)
    for name, mod in config.model.modalities.items():
        check_modality_name(name, "model.modalities")
        check_encoder(name, mod.encoder)
        _check_trainability(name, mod)
    validate(config)
    ci = config.scenario.class_incremental
    if ci is not None:
        _check_modalities(config, "scenario.class_incremental", ci.dataset, ci.modalities)
    for i, task in enumerate(config.scenario.tasks):
        _check_modalities(config, f"scenario.tasks[{i}]", task.dataset, task.modalities)
    validate_strategies(config.strategies, config.strategy_args, scenario_kind(config))
    build_plugins(config.plugins)


def import_modules(modules: Sequence[str]) -> None:
    """Import each module a config lists under ``imports`` (an import registers what the
    module defines); one that cannot be imported is a ``ConfigError`` naming it."""
    for i, module in enumerate(modules):
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f"imports[{i}]: {shown(module)} is not a module name (a dotted "
                              "path such as my_lab.strategies)")
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"imports[{i}]: cannot import {module!r}: {err} (a module must "
                              "be installed or on PYTHONPATH)") from err
        except ComodalError as err:  # a registration the module made was refused
            raise ConfigError(f"imports[{i}]: importing {module!r}: {err}") from err
        except Exception as err:  # the module's own code failed
            raise ConfigError(f"imports[{i}]: importing {module!r} failed: "
                              f"{type(err).__name__}: {err}") from err


def scenario_kind(config: RunConfig) -> str:
    """``pair``, ``classify`` or ``sequence``: what every task of the configured scenario is."""
    ci = config.scenario.class_incremental
    if ci is None:
        return "pair"
    return "sequence" if ci.target == "sequence" else "classify"


def _check_trainability(name: str, mod: ModalityConfig) -> None:
    trainable = {"audio": "conv' or 'hf", "vision": "conv", "text": "embedding-bag' or 'hf"}
    if mod.freeze_feature_encoder and not (name == "audio" and mod.encoder == "hf"
                                           and mod.frozen is False):
        raise ConfigError(f"model.modalities.{name}.freeze_feature_encoder: only a trained "
                          "Hugging Face audio encoder (encoder: hf, frozen: false) has a "
                          "feature encoder to freeze")
    if mod.max_seconds < 0:
        raise ConfigError(f"model.modalities.{name}.max_seconds: must be >= 0, "
                          f"got {mod.max_seconds}")
    if mod.encoder in ("logmel-stats", "image-stats", "features") and mod.frozen is False:
        instead = (f"use encoder '{trainable[name]}' for a trainable {name} encoder"
                   if name in trainable else f"{name!r} has no trainable encoder (only "
                   f"{', '.join(ENCODERS)} do): its features are fixed, its head trains")
        raise ConfigError(f"model.modalities.{name}.frozen: {mod.encoder!r} is fixed and cannot "
                          f"be trained; {instead}")
    if mod.encoder in ("conv", "embedding-bag") and mod.frozen is True:
        raise ConfigError(
            f"model.modalities.{name}.frozen: {mod.encoder!r} is a small encoder trained from "
            f"scratch and cannot be frozen; leave 'frozen' unset"
        )


def _check_modalities(config: RunConfig, where: str, dataset: str, modalities: list[str]) -> None:
    resolved = resolve_task(dataset, modalities, config.data, where)
    for m in resolved.modalities:
        if m not in config.model.modalities:
            raise ConfigError(
                f"{where}.modalities: modality {m!r} is not configured under model.modalities "
                f"(configured: {', '.join(config.model.modalities)})"
            )
        encoder = config.model.modalities[m].encoder
        if resolved.dataset.startswith("cmcl/") and encoder != "features":
            raise ConfigError(f"model.modalities.{m}.encoder: {resolved.dataset} holds "
                              f"precomputed {m} features, so {m} needs encoder: features (with "
                              f"dim: their width), not {encoder!r}")


def plugin_class(path: str, where: str) -> type:
    """The class a dotted path names; a path that does not import or names something other
    than a class is a ``ConfigError`` at ``where``."""
    module, _, name = path.rpartition(".")
    if not module or not all(part.isidentifier() for part in path.split(".")):
        raise ConfigError(f"{where}: {shown(path)} is not a dotted path to a class, such as "
                          "avalanche.training.plugins.EWCPlugin")
    try:
        found = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ConfigError(f"{where}: cannot import {module!r} for {path!r}: {err}") from err
    except AttributeError:
        raise ConfigError(f"{where}: module {module!r} has no {name!r}") from None
    if not isinstance(found, type):
        raise ConfigError(f"{where}: {path!r} is not a class (it is a "
                          f"{type(found).__name__})")
    return found


def build_plugins(entries: Sequence[Mapping[str, Any]]) -> list[Any]:
    """A fresh object per ``plugins`` entry, in order, built as ``class(**args)``; arguments
    its constructor refuses are a ``ConfigError`` naming ``plugins[i].args``."""
    plugins = []
    for i, entry in enumerate(entries):
        cls = plugin_class(entry["class"], f"plugins[{i}].class")
        args = dict(entry.get("args", {}))
        try:
            plugins.append(cls(**args))
        except TypeError as err:
            raise ConfigError(f"plugins[{i}].args: {cls.__name__} refuses {shown(args)} "
                              f"({err}); its parameters: {_parameters(cls)}") from err
        except Exception as err:  # a constructor checks its arguments in its own way
            raise ConfigError(f"plugins[{i}].args: {cls.__name__}(**{shown(args)}) failed: "
                              f"{type(err).__name__}: {err}") from err
    return plugins


def _parameters(cls: type) -> str:
    try:
        return str(inspect.signature(cls))
    except (TypeError, ValueError):  # a constructor written in C may have no signature
        return "unknown"


def stateless_plugins(config: RunConfig) -> list[str]:
    """The class paths of the configured plugins without ``state_dict`` and
    ``load_state_dict``: a checkpoint cannot hold their state."""
    return [entry["class"] for i, entry in enumerate(config.plugins)
            if not all(callable(getattr(plugin_class(entry["class"], f"plugins[{i}].class"),
                                        method, None))
                       for method in ("state_dict", "load_state_dict"))]


def check_resume(config: RunConfig, checkpoints: Path) -> None:
    """Refuse to resume from the checkpoints in ``checkpoints`` when a configured plugin has
    no ``state_dict``: its state is not in them, so the resumed run would silently differ
    from an uninterrupted one."""
    stateless = stateless_plugins(config)
    if stateless and checkpoint.saved(checkpoints):
        raise ConfigError(f"--resume: plugin {stateless[0]} has no state_dict, so its state "
                          "(such as EWCPlugin's importances) is not in the checkpoints of "
                          f"{checkpoints} and cannot be restored; run without --resume to "
                          "start over")
