"""Typed run configuration: dataclasses composed from defaults, YAML and ``key=value``
overrides.

Every field is typed and range-checked when the file is loaded, so a typo fails before any
data is made. The names a config gives (strategies, datasets, encoders, plugin classes, the
modules under ``imports``) are checked against the registries and user code by
``comodal.build.check``, which every run and comparison calls first: this module imports none
of them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comodal.errors import ConfigError
from comodal.yaml_input import parse_yaml, read_yaml, shown


@dataclass
class ModalityConfig:
    """How one modality is encoded: the backbone choice and its preprocessing."""

    encoder: str
    frozen: bool | None = None  # None: the encoder's nature (hf frozen, conv and bags trained)
    path: str | None = None  # local Hugging Face directory; None = the bundled MiniLM
    sample_rate: int = 16000
    n_mels: int = 40
    dim: int = 64  # width of a small trainable encoder, or of precomputed features
    max_length: int = 32
    max_seconds: float = 0.0  # audio: keep at most this long (0: everything)
    freeze_feature_encoder: bool = False  # audio hf, trained: keep its conv front end fixed


def _default_modalities() -> dict[str, ModalityConfig]:
    return {
        "vision": ModalityConfig(encoder="image-stats"),
        "audio": ModalityConfig(encoder="logmel-stats"),
        "text": ModalityConfig(encoder="hf"),
    }


@dataclass
class DecoderConfig:
    """The sequence-to-sequence SLU decoder (``scenario.class_incremental.target: sequence``):
    a pre-norm ``nn.TransformerDecoder`` over the audio encoder's frames, and its BPE
    vocabulary. The papers' is 6 layers of width 768 (8 heads, FFN 3072) with beam 10-20; the
    default is a CPU-sized one."""

    dim: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 512
    dropout: float = 0.1
    vocab_size: int = 1000  # the BPE vocabulary's size at most (the papers' 1000)
    max_length: int = 48  # tokens of a target or a decoded sequence, [SOS] and [EOS] included
    frame_stride: int = 4  # audio frames averaged into one decoder memory position
    beam_width: int = 5  # at evaluation; 1: greedy
    length_penalty: float = 0.6  # GNMT's alpha: scores divided by ((5 + L) / 6) ** alpha
    # the splits whose targets (of every task) train the tokenizer: [train] as the papers
    tokenizer_splits: list[str] = field(default_factory=lambda: ["train"])


@dataclass
class ModelConfig:
    joint_dim: int = 256
    temperature: float = 0.07
    learnable_temperature: bool = True
    modalities: dict[str, ModalityConfig] = field(default_factory=_default_modalities)
    # how two joint embeddings are scored (losses, retrieval, zero-shot, the strategies' pair
    # losses): cosine (L2-normalised) | dot (the heads' raw outputs, as the CMCL code)
    score: str = "cosine"
    # auto (identity where a head's widths match, else orthogonal) | identity | orthogonal
    head_init: str = "auto"
    head_bias: bool = False  # heads with a bias, zero-initialised (the CMCL code's Linear)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class TaskConfig:
    """A pair task. ``dataset`` may index the rows of CMCL feature files instead of naming the
    modalities, as the CMCL code's task strings do: ``cmcl/nyudv2:0,2``."""

    dataset: str
    modalities: list[str] = field(default_factory=list)
    name: str | None = None


@dataclass
class ClassIncrementalConfig:
    """Classes of one labelled dataset arriving task by task: the first modality is classified,
    an optional second one (the transcript) pairs with it for audio-text losses."""

    dataset: str
    modalities: list[str]
    increments: list[int] = field(default_factory=list)  # classes per task; the last repeats
    order: list[int] | None = None  # class ids in arrival order; default ascending
    # or: tasks by the dataset's class groups (SLURP's scenarios), alphabetically, this many
    # groups per task
    groups_per_task: int = 0
    subset: bool = False  # true: ``order`` may leave classes out (the ones used are printed)
    # intent: a classifier over the classes seen so far; sequence: an encoder-decoder writing
    # "<intent> _SEP <transcription>" (model.decoder; COCONUT's and seq-KD's setting)
    target: str = "intent"


@dataclass
class ScenarioConfig:
    tasks: list[TaskConfig] = field(default_factory=list)
    class_incremental: ClassIncrementalConfig | None = None


@dataclass
class SynthPairsConfig:
    """Size and seed of the embedded ``synth-pairs`` world."""

    seed: int = 0
    train_size: int = 1500
    test_size: int = 400


@dataclass
class FeaturesConfig:
    """A bring-your-own-features dataset (``comodal.scenarios.features``)."""

    index: str  # CSV: id, split (train | test), optional label
    modalities: dict[str, str] = field(default_factory=dict)  # modality -> .npy / .safetensors


@dataclass
class CMCLConfig:
    """The CMCL authors' feature files (``comodal.scenarios.cmcl``), datasets ``cmcl/<name>``:
    ``<root>/{name}_{split}_{backbone}.h5`` and ``<root>/{name}_class_{backbone}.h5``."""

    root: str | None = None  # the directory of the .h5 files
    backbone: str = "imagebind"  # the files' {backbone} part: imagebind, languagebind, unibind
    # dataset -> the modality of each row of its [M, d] arrays, in order; for datasets outside
    # the built-in table of the CMCL stream (or to replace an entry of it)
    modalities: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SynthFSCConfig:
    """The synthesised spoken-commands corpus (``comodal.scenarios.synth_fsc``)."""

    seed: int = 0
    train_speakers: int = 20
    valid_speakers: int = 4
    test_speakers: int = 4
    noise: bool = True


@dataclass
class FSCConfig:
    """Dataset ``fsc``: a Fluent Speech Commands directory, or (``root: null``) the
    synthesised corpus, generated under ``<cache_dir>/synth-fsc/`` on first use."""

    root: str | None = None
    synth: SynthFSCConfig = field(default_factory=SynthFSCConfig)
    on_error: str = "raise"  # raise | skip (bad rows dropped, counted and reported)


@dataclass
class SlurpConfig:
    """Dataset ``slurp``: ``{train,devel,test}.jsonl`` and the recordings under ``audio_dir``."""

    root: str | None = None
    audio_dir: str = "slurp_real"
    on_error: str = "raise"


@dataclass
class DataConfig:
    cache_dir: str = ".comodal_cache"
    synth_pairs: SynthPairsConfig = field(default_factory=SynthPairsConfig)
    fsc: FSCConfig = field(default_factory=FSCConfig)
    slurp: SlurpConfig = field(default_factory=SlurpConfig)
    features: dict[str, FeaturesConfig] = field(default_factory=dict)  # datasets features/<name>
    cmcl: CMCLConfig = field(default_factory=CMCLConfig)  # datasets cmcl/<name>


@dataclass
class LossConfig:
    name: str = "infonce"
    symmetric: bool = True


@dataclass
class SchedulerConfig:
    """The learning rate within each task (``comodal.platform.schedules``), stepped once per
    optimizer step."""

    name: str = "none"  # none | cosine | step | linear
    warmup_epochs: float = 0.0  # linear warmup from 0 to lr over this many epochs
    step_epochs: int = 1  # step: lr *= gamma every step_epochs epochs after the warmup
    gamma: float = 0.1
    # cosine: the lr at the task's last step; linear: the lr one step after the last
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    loss: LossConfig = field(default_factory=LossConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    keep_optimizer: bool = False  # one optimizer, with its moments, across tasks
    check_ranks: bool = False  # under torchrun: compare every rank's state after each task
    # 32 | bf16 | 16-mixed (comodal.platform.precision); YAML's 32 is an int, kept as "32"
    precision: str | int = "32"
    # the global norm of the trainable parameters' gradients is clipped to this before the
    # strategies' after_backward hooks (the CMCL code's 1.0); null: no clipping
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.precision, int) and not isinstance(self.precision, bool):
            self.precision = str(self.precision)


@dataclass
class EvalConfig:
    pool_size: int = 1000
    pool_draws: int = 5
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 512
    every_epochs: int = 0  # also evaluate every this many training epochs (for plugins)

    def __post_init__(self) -> None:
        if self.every_epochs < 0:
            raise ConfigError(f"eval.every_epochs: must be >= 0 (0: only after each task), "
                              f"got {self.every_epochs}")


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "cpu"
    strategies: list[str] = field(default_factory=lambda: ["finetune"])
    strategy_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    # objects such as stock Avalanche plugins, {class: dotted path, args: {...}}, built afresh
    # for every run and called after the strategies
    plugins: list[dict[str, Any]] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)  # modules imported before any check
    out: str | None = None
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


OPTIMIZERS = ("adamw", "adam", "sgd")
LOSSES = ("infonce",)
SCHEDULERS = ("none", "cosine", "step", "linear")
SCORES = ("cosine", "dot")  # model.score (comodal.platform.model)
HEAD_INITS = ("auto", "identity", "orthogonal")  # model.head_init
PRECISIONS = ("32", "bf16", "16-mixed")  # train.precision (comodal.platform.precision)
EXECUTORS = ("local", "ray")  # compare --executor (comodal.platform.compare)
REPORT_COLUMNS = ("default", "cmcl")  # summary table columns: comodal's, the CMCL paper's
TARGETS = ("intent", "sequence")  # scenario.class_incremental.target
SPLITS = ("train", "test")  # model.decoder.tokenizer_splits


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _finite(value: float | int | str, where: str) -> float:
    """``value`` as a float, which every float field needs finite (``nan`` passes ``<= 0``)."""
    try:
        number = float(value)
    except OverflowError:  # an integer past the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{where}: must be a finite number, got {shown(value)}")
    return number


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {shown(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return _finite(value, where)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            float(value)
        except ValueError:
            pass
        else:
            return _finite(value, where)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {shown(value)}")
    return _finite(value, where) if tp is float else value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key {shown(key)} (valid keys: {', '.join(names)})"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where != "config" else f.name
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required field is missing")
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested mapping; a number
    indexes a list, as in ``scenario.tasks.1.dataset=synth-pairs/gems``."""
    if "=" not in assignment:
        raise ConfigError(f"--set {shown(assignment)}: expected key=value, "
                          "for example train.epochs=5")
    key, raw = assignment.split("=", 1)
    where = f"--set {shown(assignment)}"
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        path = ".".join(parts[:depth])
        if isinstance(node, list):
            index = _list_index(node, part, path, where)
        elif isinstance(node, dict):
            index = part
            if depth < len(parts) - 1:
                node.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: {path} is {shown(node)}, not a mapping or a list")
        if depth == len(parts) - 1:
            node[index] = parse_yaml(raw, where)
        else:
            node = node[index]


def _list_index(items: list, part: str, path: str, where: str) -> int:
    """``part`` as an index into the list at key ``path``, or a ``ConfigError`` naming the path
    and the list's length."""
    length = f"{len(items)} item{'' if len(items) == 1 else 's'}"
    valid = f"indices 0 to {len(items) - 1}" if items else "no index is valid"
    if not (part.isascii() and part.isdigit()):
        raise ConfigError(f"{where}: {path} is a list of {length}; index it with a number "
                          f"({valid}), got {shown(part)}")
    if int(part) >= len(items):
        raise ConfigError(f"{where}: index {int(part)} is out of range: {path} is a list of "
                          f"{length} ({valid})")
    return int(part)


REPLACED_WHOLE = ("modalities", "strategy_args")  # mappings a config gives in full


def merge(defaults: dict, given: dict) -> dict:
    """``given`` over ``defaults``, recursively; the mappings in ``REPLACED_WHOLE`` are taken
    as given, so that listing two modalities does not keep the third default one."""
    out = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) \
                and key not in REPLACED_WHOLE:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = (),
                check: bool = True) -> RunConfig:
    """Read a YAML run config, apply overrides, type every field and run ``validate``
    (``check=False`` leaves the cross-field checks to the caller: a comparison validates each
    of its runs instead). The names it gives are checked by ``comodal.build.check``."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    data = merge(to_dict(RunConfig()), data)
    for assignment in overrides:
        apply_override(data, assignment)
    config = from_dict(RunConfig, data)
    if check:
        validate(config)
    return config


def check_choice(where: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{where}: unknown value {shown(value)} (valid: {', '.join(choices)})")


def _at_least(where: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{where}: must be at least {low}, got {value}")


def _check_numbers(config: RunConfig) -> None:
    for where, number in (
        ("seed", config.seed), ("data.synth_pairs.seed", config.data.synth_pairs.seed),
        ("data.fsc.synth.seed", config.data.fsc.synth.seed),
    ):
        _at_least(where, number, 0)
        if number >= 2**32:
            raise ConfigError(f"{where}: must be below 2**32 (the seed range of numpy), "
                              f"got {shown(number)}")
    synth = config.data.fsc.synth
    for where, number in (("data.fsc.synth.train_speakers", synth.train_speakers),
                          ("data.fsc.synth.valid_speakers", synth.valid_speakers),
                          ("data.fsc.synth.test_speakers", synth.test_speakers)):
        _at_least(where, number, 1)
    check_choice("data.fsc.on_error", config.data.fsc.on_error, ("raise", "skip"))
    check_choice("data.slurp.on_error", config.data.slurp.on_error, ("raise", "skip"))
    for where, number in (
        ("train.epochs", config.train.epochs), ("train.batch_size", config.train.batch_size),
        ("eval.pool_size", config.eval.pool_size), ("eval.pool_draws", config.eval.pool_draws),
        ("eval.batch_size", config.eval.batch_size), ("model.joint_dim", config.model.joint_dim),
        ("data.synth_pairs.train_size", config.data.synth_pairs.train_size),
        ("data.synth_pairs.test_size", config.data.synth_pairs.test_size),
    ):
        _at_least(where, number, 1)
    for i, k in enumerate(config.eval.ks):
        _at_least(f"eval.ks[{i}]", k, 1)
    if not config.eval.ks:
        raise ConfigError("eval.ks: name at least one k, for example [1, 5, 10]")
    for where, value in (("train.lr", config.train.lr),
                         ("model.temperature", config.model.temperature)):
        if value <= 0:
            raise ConfigError(f"{where}: must be positive, got {value}")
    if config.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: must be >= 0, got {config.train.weight_decay}")
    clip = config.train.clip_grad_norm
    if clip is not None and clip <= 0:
        raise ConfigError(f"train.clip_grad_norm: must be positive (null: no clipping), "
                          f"got {clip}")


def _check_scheduler(train: TrainConfig) -> None:
    """The schedule's name and ranges; its warmup must end within a task's epochs."""
    sched, where = train.scheduler, "train.scheduler"
    check_choice(f"{where}.name", sched.name, SCHEDULERS)
    if not 0 <= sched.warmup_epochs < train.epochs:
        raise ConfigError(f"{where}.warmup_epochs: must be >= 0 and less than train.epochs "
                          f"({train.epochs}), got {sched.warmup_epochs}")
    if sched.warmup_epochs and sched.name == "none":
        raise ConfigError(f"{where}.warmup_epochs: a warmup needs a schedule to warm up to; "
                          "set train.scheduler.name to cosine, linear or step (gamma: 1 keeps "
                          "lr)")
    _at_least(f"{where}.step_epochs", sched.step_epochs, 1)
    if not 0 < sched.gamma <= 1:
        raise ConfigError(f"{where}.gamma: must be in (0, 1], got {sched.gamma}")
    if not 0 <= sched.min_lr <= train.lr:
        raise ConfigError(f"{where}.min_lr: must be >= 0 and at most train.lr ({train.lr}), "
                          f"got {sched.min_lr}")


def _check_device(device: str) -> None:
    """``auto`` (CUDA when there is one, resolved when the trainer is built), ``cpu`` or an
    available ``cuda[:N]``."""
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device: {device!r} is not a device (for example auto, cpu, cuda, "
                          f"cuda:1)") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for, but no CUDA device is available "
                          f"(use cpu, or auto to take CUDA where there is one)")
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {device!r} is not supported (valid: auto, cpu, cuda[:N])")
    if parsed.type == "cuda" and parsed.index is not None \
            and parsed.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} asked for, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 to "
                          f"cuda:{torch.cuda.device_count() - 1})")


MODALITY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_NAMES = ("label", "index", "task_id")  # the keys a batch holds beside its modalities
FILE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a CMCL dataset or backbone name


def check_modality_name(name: str, where: str) -> None:
    """A modality may have any name that is an identifier (letters, digits and _, not starting
    with a digit) other than the keys a batch holds beside its modalities."""
    if not MODALITY_NAME.fullmatch(name):
        raise ConfigError(f"{where}: modality name {shown(name)} is not a name: use letters, "
                          "digits and _ (not starting with a digit), such as depth or thermal")
    if name in RESERVED_NAMES:
        raise ConfigError(f"{where}: modality name {name!r} is reserved (a batch's {name!r} "
                          "key); choose another name")


def task_rows(dataset: str, where: str) -> tuple[str, tuple[int, int] | None]:
    """``dataset`` without a trailing ``:i,j``, and the row indices ``i, j`` it gives (the CMCL
    code's task strings, such as ``cmcl/nyudv2:0,2``) or None."""
    base, sep, rows = dataset.partition(":")
    if not sep:
        return dataset, None
    parts = [p.strip() for p in rows.split(",")]
    if not base or len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts) \
            or int(parts[0]) == int(parts[1]):
        raise ConfigError(f"{where}: {shown(dataset)}: after ':' give two different row indices "
                          "of the dataset's feature arrays, such as cmcl/nyudv2:0,2")
    return base, (int(parts[0]), int(parts[1]))


def _check_cmcl(cmcl: CMCLConfig) -> None:
    where = "data.cmcl"
    if not FILE_PART.fullmatch(cmcl.backbone):
        raise ConfigError(f"{where}.backbone: {shown(cmcl.backbone)} is not a file-name part "
                          "(the {backbone} of {dataset}_{split}_{backbone}.h5, such as imagebind)")
    for name, modalities in cmcl.modalities.items():
        if not FILE_PART.fullmatch(name):
            raise ConfigError(f"{where}.modalities: {shown(name)} is not a dataset name (the "
                              "{dataset} of {dataset}_{split}_{backbone}.h5)")
        if not modalities:
            raise ConfigError(f"{where}.modalities.{name}: name the modality of each row of "
                              "its feature arrays, in order, such as [vision, text, depth]")
        for m in modalities:
            check_modality_name(m, f"{where}.modalities.{name}")
        repeated = [m for m in modalities if modalities.count(m) > 1]
        if repeated:
            raise ConfigError(f"{where}.modalities.{name}: {repeated[0]!r} is listed twice")


def _check_task(i: int, task: TaskConfig) -> None:
    """A pair task names two different modalities, unless it indexes the rows of CMCL files
    (``cmcl/<name>:i,j``) or takes a CMCL dataset's first two rows (``cmcl/<name>``, as the
    CMCL code does)."""
    base, rows = task_rows(task.dataset, f"scenario.tasks[{i}].dataset")
    if not task.modalities and (rows is not None or base.startswith("cmcl/")):
        return
    if len(task.modalities) != 2 or task.modalities[0] == task.modalities[1]:
        raise ConfigError(
            f"scenario.tasks[{i}].modalities: a pair task names two different modalities, "
            f"got {shown(task.modalities)}"
        )


def validate(config: RunConfig) -> None:
    """Checks across fields that need no registry (ranges, the scenario's shape, plugin
    entries); ``comodal.build.check`` runs them with the checks of names."""
    for name, mod in config.model.modalities.items():
        check_modality_name(name, "model.modalities")
        for key in ("sample_rate", "n_mels", "dim", "max_length"):
            _at_least(f"model.modalities.{name}.{key}", getattr(mod, key), 1)
    check_choice("train.optimizer", config.train.optimizer, OPTIMIZERS)
    check_choice("train.loss.name", config.train.loss.name, LOSSES)
    check_choice("train.precision", str(config.train.precision), PRECISIONS)
    check_choice("model.score", config.model.score, SCORES)
    check_choice("model.head_init", config.model.head_init, HEAD_INITS)
    _check_numbers(config)
    _check_scheduler(config.train)  # after train.epochs and train.lr are checked
    _check_device(config.device)
    _check_cmcl(config.data.cmcl)
    scenario = config.scenario
    if (not scenario.tasks) == (scenario.class_incremental is None):
        raise ConfigError("scenario: give either tasks (modality pairs) or class_incremental, "
                          "exactly one of them")
    if scenario.class_incremental is not None:
        _check_class_incremental(config, scenario.class_incremental)
    names = [t.name for t in scenario.tasks if t.name is not None]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"scenario.tasks: task name {shown(name)} is used twice")
    for i, task in enumerate(scenario.tasks):
        _check_task(i, task)
    _check_plugins(config.plugins)


def _check_plugins(plugins: list[dict[str, Any]]) -> None:
    """Each entry is ``{class: dotted path, args: mapping}`` (``args`` optional)."""
    for i, entry in enumerate(plugins):
        where = f"plugins[{i}]"
        for key in entry:
            if key not in ("class", "args"):
                raise ConfigError(f"{where}: unknown key {shown(key)} (valid keys: class, args)")
        if "class" not in entry:
            raise ConfigError(f"{where}.class: required field is missing (a dotted path such "
                              "as avalanche.training.plugins.EWCPlugin)")
        if not isinstance(entry["class"], str):
            raise ConfigError(f"{where}.class: expected str, got {shown(entry['class'])}")
        if not isinstance(entry.get("args", {}), dict):
            raise ConfigError(f"{where}.args: expected a mapping, got {shown(entry['args'])}")


def _check_class_incremental(config: RunConfig, ci: ClassIncrementalConfig) -> None:
    where = "scenario.class_incremental"
    if len(ci.modalities) not in (1, 2) or len(set(ci.modalities)) != len(ci.modalities):
        raise ConfigError(f"{where}.modalities: name the classified modality and optionally "
                          f"its transcript modality, got {shown(ci.modalities)}")
    if bool(ci.increments) == bool(ci.groups_per_task):
        raise ConfigError(f"{where}: give increments (classes per task) or groups_per_task, "
                          "exactly one of them")
    if ci.groups_per_task and ci.order is not None:
        raise ConfigError(f"{where}.order: groups_per_task orders the classes by group; "
                          "leave order unset")
    if (ci.increments and min(ci.increments) < 1) or ci.groups_per_task < 0:
        raise ConfigError(f"{where}.increments: classes per task must be positive integers, "
                          f"got {shown(ci.increments)}")
    if ci.order is not None and len(set(ci.order)) != len(ci.order):
        raise ConfigError(f"{where}.order: a class appears twice in {shown(ci.order)}")
    check_choice(f"{where}.target", ci.target, TARGETS)
    if ci.target == "sequence":
        _check_sequence(config, ci)


def _check_sequence(config: RunConfig, ci: ClassIncrementalConfig) -> None:
    """A sequence target: the audio modality alone (the transcript is the target's last
    field), a trained audio encoder (the decoder reads its frames), a decoder that fits."""
    where = "scenario.class_incremental"
    if list(ci.modalities) != ["audio"]:
        raise ConfigError(f"{where}.modalities: target: sequence decodes the transcript from "
                          f"the audio, so name only [audio], got {shown(ci.modalities)}")
    audio = config.model.modalities.get("audio")
    if audio is None or audio.encoder not in ("conv", "hf") or audio.frozen:
        raise ConfigError(f"{where}.target: sequence reads the audio encoder's frames, so "
                          "model.modalities.audio needs a trained encoder (encoder: conv, or "
                          "hf with frozen: false)")
    dec = config.model.decoder
    for key in ("dim", "layers", "heads", "ffn", "frame_stride", "beam_width"):
        _at_least(f"model.decoder.{key}", getattr(dec, key), 1)
    _at_least("model.decoder.vocab_size", dec.vocab_size, 16)
    _at_least("model.decoder.max_length", dec.max_length, 3)
    if dec.dim % dec.heads:
        raise ConfigError(f"model.decoder.dim: {dec.dim} is not divisible by "
                          f"model.decoder.heads ({dec.heads})")
    if not 0 <= dec.dropout < 1 or dec.length_penalty < 0:
        raise ConfigError(f"model.decoder: dropout must be in [0, 1) and length_penalty >= 0, "
                          f"got {dec.dropout} and {dec.length_penalty}")
    if not dec.tokenizer_splits:
        raise ConfigError("model.decoder.tokenizer_splits: name at least one split (the "
                          "papers': [train])")
    for i, split in enumerate(dec.tokenizer_splits):
        check_choice(f"model.decoder.tokenizer_splits[{i}]", split, SPLITS)


def to_dict(config: RunConfig) -> dict:
    """The resolved config as plain data, as written into a run directory."""
    return dataclasses.asdict(config)
