"""Configuration: one dataclass per ``params.yaml`` section, loaded and validated in one place.

Only entry points (CLI, DVC stages, Kubeflow components) read YAML; library functions take these
dataclasses. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming
the offending ``section.key``, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unet3plus.errors import ConfigError
from unet3plus.utils import redact

logger = logging.getLogger(__name__)
LAYOUTS = ("lits", "msd-spleen")
DATASET_OF_LAYOUT = {"lits": "liver", "msd-spleen": "spleen"}
SQLITE = "sqlite:///"


@dataclass
class DataConfig:
    """Synthesis, validation and preprocessing of the raw CT volumes."""

    root: str = "data/raw"  # raw datasets <root>/<organ>: data/raw (synthetic phantom) or data/real (DVC-versioned)
    size: int = 320  # output in-plane size of every sample (paper: 320)
    hu_window: tuple[float, float] = (-200.0, 250.0)  # HU range mapped to [0, 1]
    resize_mode: str = "resize"  # "resize" (bilinear image, nearest mask), "crop" (centre crop/pad) or "spacing"
    spacing_mm: float = 1.4  # spacing mode: in-plane pixel spacing (mm) before the centre crop/pad to size
    val_fraction: float = 0.15  # share of training cases held out for validation
    test_fraction: float = 0.2  # share of cases used for test when the layout has no fixed split
    split_seed: int = 0
    workers: int = 2  # parallel processes over volumes
    synth_cases: int = 10
    synth_seed: int = 0
    synth_size: int = 128  # in-plane voxels of synthetic volumes
    synth_slices: int = 48  # slices of synthetic volumes (before spacing)

    def validate(self) -> None:
        _check(bool(self.root.strip()), "data.root", self.root, "a folder such as 'data/raw' (synthetic) or 'data/real'")
        _check(self.size >= 16, "data.size", self.size, "an integer >= 16")
        _check(self.hu_window[0] < self.hu_window[1], "data.hu_window", self.hu_window, "[low, high] with low < high")
        _check(self.resize_mode in ("resize", "crop", "spacing"), "data.resize_mode", self.resize_mode, "'resize', 'crop' or 'spacing'")
        _check(self.spacing_mm > 0, "data.spacing_mm", self.spacing_mm, "a number > 0 (mm)")
        for name in ("val_fraction", "test_fraction"):
            _check(0.0 <= getattr(self, name) < 1.0, f"data.{name}", getattr(self, name), "a number in [0, 1)")
        _check(self.workers >= 1, "data.workers", self.workers, "an integer >= 1")
        _check(self.synth_cases >= 1, "data.synth_cases", self.synth_cases, "an integer >= 1")
        _check(self.synth_size >= 32, "data.synth_size", self.synth_size, "an integer >= 32")
        _check(self.synth_slices >= 8, "data.synth_slices", self.synth_slices, "an integer >= 8")


@dataclass
class ModelConfig:
    """Arguments of :func:`unet3plus.create_model` (field names match its keywords)."""

    arch: str = "unet3plus"  # unet | unet2plus | unet3plus
    encoder: str = "unet"  # unet | vgg16 | resnet101
    encoder_weights: str | None = None  # local torchvision state dict; nothing is downloaded
    deep_supervision: bool = True
    cgm: bool = True
    in_channels: int = 3
    num_classes: int = 1
    width: int = 64  # channels of the first stage; 64 is the paper
    skip_impl: str = "auto"  # auto | naive | factored: how UNet 3+ computes up-sample + conv (forward only)

    def validate(self) -> None:
        _check(self.arch in ("unet", "unet2plus", "unet3plus"), "model.arch", self.arch, "'unet', 'unet2plus' or 'unet3plus'")
        _check(self.encoder in ("unet", "vgg16", "resnet101"), "model.encoder", self.encoder, "'unet', 'vgg16' or 'resnet101'")
        # 512 is 8x the paper's channels (64x its parameters): above, a width is a typo, not a model.
        _check(1 <= self.width <= 512, "model.width", self.width, "an integer from 1 to 512")
        _check(self.in_channels >= 1, "model.in_channels", self.in_channels, "an integer >= 1")
        _check(self.num_classes >= 1, "model.num_classes", self.num_classes, "an integer >= 1")
        _check(self.skip_impl in ("auto", "naive", "factored"), "model.skip_impl", self.skip_impl, "'auto', 'naive' or 'factored'")
        # The data are 3-slice stacks (previous, current, next) with one organ mask each.
        _check(self.in_channels == 3, "model.in_channels", self.in_channels, "3 (the preprocessed samples are 3-slice stacks)")
        _check(self.num_classes == 1, "model.num_classes", self.num_classes, "1 (one organ mask per dataset; multi-class is not supported)")
        _check(self.encoder_weights is None or self.encoder in ("vgg16", "resnet101"), "model.encoder_weights",
               self.encoder_weights, "null for model.encoder 'unet' (weights load only into 'vgg16' or 'resnet101')")


@dataclass
class LossConfig:
    """Weights of the hybrid loss parts (focal + MS-SSIM + IoU) and of the CGM's BCE term."""

    focal_weight: float = 1.0
    ms_ssim_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cgm_weight: float = 1.0

    def validate(self) -> None:
        for name in ("focal_weight", "ms_ssim_weight", "iou_weight", "cgm_weight", "focal_gamma"):
            _check(getattr(self, name) >= 0, f"loss.{name}", getattr(self, name), "a number >= 0")
        _check(0.0 <= self.focal_alpha <= 1.0 or self.focal_alpha < 0, "loss.focal_alpha", self.focal_alpha,
               "a number in [0, 1], or negative to disable")
        _check(self.focal_weight + self.ms_ssim_weight + self.iou_weight > 0, "loss", "all weights 0",
               "at least one positive segmentation loss weight")


@dataclass
class TrainConfig:
    """Optimisation and the training loop."""

    epochs: int = 20
    batch_size: int = 8
    optimizer: str = "sgd"  # sgd (the paper's, with momentum) | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"  # poly | cosine | constant
    poly_power: float = 0.9
    warmup_epochs: float = 0.0  # linear learning-rate warm-up before the schedule, in epochs (fractions allowed)
    select_checkpoint: str = "val_dice"  # what best.pt keeps: the best validation Dice (val_dice) or the final epoch (last_epoch)
    seed: int = 0
    num_workers: int = 2  # DataLoader workers
    augment: bool = True
    organ_fraction: float = 0.5  # minimum share of organ-containing slices per epoch (oversampling)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: bool = True  # bf16 autocast + channels_last on CUDA; ignored on CPU
    max_steps_per_epoch: int | None = None  # cap for quick runs; None = the whole training split

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.optimizer in ("sgd", "adamw"), "train.optimizer", self.optimizer, "'sgd' or 'adamw'")
        _check(self.lr > 0, "train.lr", self.lr, "a number > 0")
        for name in ("momentum", "weight_decay"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "a number >= 0")
        _check(self.poly_power > 0, "train.poly_power", self.poly_power, "a number > 0")
        _check(self.select_checkpoint in ("val_dice", "last_epoch"), "train.select_checkpoint", self.select_checkpoint,
               "'val_dice' or 'last_epoch'")
        _check(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs", self.warmup_epochs, "a number in [0, train.epochs]")
        _check(_DEVICE.fullmatch(self.device) is not None, "train.device", self.device, DEVICE_CHOICES)
        _check(self.schedule in ("poly", "cosine", "constant"), "train.schedule", self.schedule, "'poly', 'cosine' or 'constant'")
        _check(0.0 <= self.organ_fraction < 1.0, "train.organ_fraction", self.organ_fraction, "a number in [0, 1)")
        _check(self.num_workers >= 0, "train.num_workers", self.num_workers, "an integer >= 0")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "train.max_steps_per_epoch",
               self.max_steps_per_epoch, "null or an integer >= 1")


@dataclass
class EvaluateConfig:
    """Per-volume scoring on the test split."""

    threshold: float = 0.5  # probability above which a voxel is organ
    batch_size: int = 8
    overlays: int = 1  # how many best and worst cases get an overlay PNG
    device: str = "auto"

    def validate(self) -> None:
        _check(0.0 < self.threshold < 1.0, "evaluate.threshold", self.threshold, "a number in (0, 1)")
        _check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")
        _check(self.overlays >= 0, "evaluate.overlays", self.overlays, "an integer >= 0")
        _check(_DEVICE.fullmatch(self.device) is not None, "evaluate.device", self.device, DEVICE_CHOICES)


@dataclass
class RegisterConfig:
    """MLflow Model Registry: ``<name_prefix>-<dataset>`` (``-synthetic`` added for phantom-trained models).

    ``alias`` moves only to a version that beats its holder on the same test set and whose test Dice
    is at least ``min_test_dice``; see :mod:`unet3plus.register`.
    """

    name_prefix: str = "unet3plus"
    alias: str = "champion"
    metric: str = "dice"  # test metric that decides whether the alias moves (hd95/assd: lower is better)
    min_test_dice: float = 0.80  # quality floor: a version below it gets no alias at all

    def validate(self) -> None:
        _check(bool(self.name_prefix), "register.name_prefix", self.name_prefix, "a non-empty string")
        _check(bool(self.alias), "register.alias", self.alias, "a non-empty string")
        _check(0.0 <= self.min_test_dice <= 1.0, "register.min_test_dice", self.min_test_dice, "a number in [0, 1]")


@dataclass
class MlflowConfig:
    """Tracking. ``MLFLOW_TRACKING_URI`` in the environment wins over ``tracking_uri``.

    Where runs go, not what a model is: no DVC stage that trains or evaluates depends on this section.
    """

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "unet3plus"
    system_metrics: bool = True

    def resolved_tracking_uri(self) -> str:
        """The URI in use: ``MLFLOW_TRACKING_URI``, else ``tracking_uri``, relative SQLite paths anchored.

        Inside a DVC stage (``DVC_ROOT`` set) a relative ``sqlite:///`` path is resolved against the
        DVC root, which for ``dvc exp run --temp`` and ``--queue`` is the project, not the throw-away
        copy under ``.dvc/tmp/exps/`` the command runs in: their runs land in the project's store.
        Elsewhere it stays relative to the working directory.
        """
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri
        relative = uri.removeprefix(SQLITE)
        root = os.environ.get("DVC_ROOT")
        if not uri.startswith(SQLITE) or not relative or relative.startswith(("/", ":memory:")) or not root:
            return uri
        return SQLITE + (Path(root).resolve() / relative).as_posix()

    def validate(self) -> None:
        _check(bool(self.experiment), "mlflow.experiment", self.experiment, "a non-empty string")
        if redact(self.tracking_uri) != self.tracking_uri:  # it would be written to params, config.yaml, checkpoints
            raise ConfigError(f"mlflow.tracking_uri: {redact(self.tracking_uri)!r} holds a login (user:password@), "
                              "which would be written with the settings; remove it and set MLFLOW_TRACKING_USERNAME "
                              "and MLFLOW_TRACKING_PASSWORD in the environment")  # fmt: skip


@dataclass
class AblationConfig:
    """One ablation: a name and ``section.key: value`` overrides applied to the base config."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")
MAIN = "main"
"""The ``ablation`` tag of the main model's runs: reserved, no variant may take it."""
VARIANT_SECTIONS = ("model", "loss", "train", "evaluate")
"""What a variant may override. ``data`` is the preprocessed data's (training uses the section the data was made
with, shared by every variant), ``mlflow`` would send the run out of the study's experiment, ``register`` is
never used (variants are not registered): such overrides would be silently ignored or lost, so they are refused."""


@dataclass
class AblationsConfig:
    """Named variants of the main model, and which of them run (``dvc repro``, the Kubeflow ParallelFor).

    ``variants`` maps a name (lower case letters, digits, ``_``: it becomes part of DVC stage names
    such as ``ablate@liver-unet3plus_no_ds`` and of folders) to ``section.key: value`` overrides of
    the base configuration; ``run`` lists the names to train, in order. An empty ``run`` trains the
    main model only.
    """

    variants: dict[str, Any] = field(default_factory=dict)
    run: list[str] = field(default_factory=list)

    def selected(self) -> list[AblationConfig]:
        """The variants named in ``run``, in that order."""
        return [AblationConfig(name, dict(self.variants[name])) for name in self.run]

    def get(self, name: str) -> AblationConfig:
        """The variant ``name``.

        Raises:
            ConfigError: no such variant (the message lists the defined ones).
        """
        if name not in self.variants:
            raise ConfigError(f"ablations.variants has no variant {name!r}; defined: {', '.join(self.variants) or 'none'}")
        return AblationConfig(name, dict(self.variants[name]))

    def validate(self) -> None:
        for name, overrides in self.variants.items():
            _check(isinstance(name, str) and VARIANT_NAME.fullmatch(name) is not None, "ablations.variants", name,
                   "variant names of lower-case letters, digits and '_' (they become DVC stage names)")
            _check(name != MAIN, "ablations.variants", name,
                   f"a name other than {MAIN!r} (the main model's runs are tagged ablation={MAIN})")
            _check(isinstance(overrides, dict), f"ablations.variants.{name}", overrides,
                   "a mapping of section.key: value overrides")
            for key in overrides:
                _check(str(key).partition(".")[0] in VARIANT_SECTIONS, f"ablations.variants.{name}", key,
                       f"keys of {', '.join(VARIANT_SECTIONS)}: a variant cannot change data.* (training uses the "
                       "preprocessed data's section, shared by all variants), mlflow.* (its run would leave the "
                       "study) or register.* (variants are never registered)")
        _check(len(self.run) == len(set(self.run)), "ablations.run", self.run, "unique names")
        unknown = [name for name in self.run if name not in self.variants]
        _check(not unknown, "ablations.run", unknown, f"names of ablations.variants ({', '.join(self.variants) or 'none defined'})")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)

    def validate(self) -> Config:
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.model.cgm and self.loss.cgm_weight == 0:
            raise ConfigError(
                "model.cgm = true with loss.cgm_weight = 0 is refused: the CGM would never be trained and would gate "
                "slices at random at inference (and leave unused parameters that crash DDP); set loss.cgm_weight > 0, "
                "or model.cgm = false for a model without the CGM"
            )
        self.ablations.validate()
        for name in self.ablations.variants:
            ablation_config(self, self.ablations.get(name))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every scalar knob (MLflow params), ablations excluded."""
        return {f"{s}.{k}": v for s in SECTIONS for k, v in dataclasses.asdict(getattr(self, s)).items()}


SECTIONS = ("data", "model", "loss", "train", "evaluate", "register", "mlflow")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
DEVICE_CHOICES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


class _DuplicateKey(yaml.YAMLError):
    pass


class ParamsLoader(yaml.SafeLoader):
    """YAML for parameters: ``1e-4`` is a float (YAML 1.2, not a string as in 1.1); a key twice is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and first.setdefault(key, line) != line:
                raise _DuplicateKey(f"line {line}: duplicate key {key!r} (first given on line {first[key]}); give each key once")
        return super().construct_mapping(node, deep=deep)


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse parameters YAML with :class:`ParamsLoader` (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {allowed}")


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting where YAML is looser (int -> float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(annotation)}")
    if origin is tuple:
        items = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a list of {len(items)} numbers")
        return tuple(_coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, items)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a list")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a mapping")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} = {value!r} is invalid: expected a finite number")
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise AssertionError(f"unsupported annotation {annotation!r} for {key}")
    raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(annotation)}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _build_section(cls: type, section: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {section!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}; allowed keys in {section!r}: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in raw.items()})


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a ``params.yaml``-shaped mapping.

    Sections other than the known ones are refused; a missing section takes its defaults.

    Raises:
        ConfigError: unknown section or key, wrong type, or invalid value.
    """
    raw = dict(raw or {})
    allowed = (*SECTIONS, "ablations")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; allowed sections: {', '.join(allowed)}")
    hints = typing.get_type_hints(Config)
    sections = {s: _build_section(hints[s], s, raw.get(s)) for s in SECTIONS}
    ablations = _build_section(AblationsConfig, "ablations", raw.get("ablations"))
    return Config(**sections, ablations=ablations).validate()


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Return a copy of ``config`` with ``section.key=value`` overrides applied (values are YAML).

    Raises:
        ConfigError: malformed override, unknown key, wrong type or invalid value.
    """
    raw = config.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=5)")
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; allowed sections: {', '.join(SECTIONS)}")
        if name not in raw[section]:
            raise ConfigError(f"override {item!r}: unknown key {key}; allowed keys in {section!r}: {', '.join(sorted(raw[section]))}")
        try:
            raw[section][name] = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return config_from_dict(raw)


def params_path(path: str | os.PathLike | None) -> Path | None:
    """The parameters file a command reads: ``path`` when given, else ``./params.yaml`` if present, else None (defaults)."""
    if path is None:
        return Path("params.yaml") if Path("params.yaml").is_file() else None
    return Path(path)


def parse_config(
    text: str | None, overrides: list[str] | None = None, ablation: str | None = None, *, source: str = "params"
) -> Config:
    """The one way a configuration is built: ``params.yaml`` text, ``--set`` overrides, then an ablation by name.

    Every entry point ends here: the CLI and DVC (through :func:`load_config`), the Kubeflow
    components (the ``params`` text they are given) and the ``torchrun`` and TrainJob workers (the
    CLI again). An ablation travels as its name only; its overrides are read from the text's own
    ``ablations.variants``.

    Args:
        text: the YAML text of a ``params.yaml``; None, empty or only comments means the defaults.
        overrides: ``section.key=value`` strings (values are YAML), applied in order.
        ablation: the name of a variant of ``ablations.variants`` to apply last, or None / ``""``
            for the configuration itself.
        source: what ``text`` is, for messages (a file path, or ``"params"``).

    Raises:
        ConfigError: the text is not YAML or not a mapping of sections, any knob is unknown,
            mistyped or invalid, an override is malformed, or the variant does not exist (each
            message names ``source``, the key or the override).
    """
    raw: Any = None
    if text is not None:
        try:
            raw = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from err
        if raw is None:
            logger.warning("%s is empty: using the built-in defaults, which differ from the repository's params.yaml", source)
        elif not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections (data, model, train, ...) at the top level, "
                              f"got {raw!r:.80}")
    try:
        config = config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    if overrides:
        try:
            config = apply_overrides(config, overrides)
        except ConfigError as err:
            raise ConfigError(f"--set: {err}") from err
    if ablation:
        config = ablation_config(config, config.ablations.get(ablation))
    return config


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, ablation: str | None = None
) -> Config:
    """Read ``params.yaml`` (or defaults when ``path`` is None), then :func:`parse_config`.

    Raises:
        ConfigError: the file is missing or not YAML, or any knob, override or the ablation is
            invalid (the message names the file and the key).
    """
    if path is None:
        return parse_config(None, overrides, ablation, source="defaults")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file; expected YAML parameters like the repository's params.yaml") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the parameters file ({err.strerror})") from err
    return parse_config(text, overrides, ablation, source=str(path))


def ablation_config(config: Config, ablation: AblationConfig) -> Config:
    """The base ``config`` with one ablation's overrides applied (and no ablations of its own).

    Raises:
        ConfigError: an override names an unknown key or gives an invalid value.
    """
    base = dataclasses.replace(config, ablations=AblationsConfig())
    try:
        return apply_overrides(base, [f"{k}={_yaml_scalar(v)}" for k, v in ablation.overrides.items()])
    except ConfigError as err:
        raise ConfigError(f"ablation {ablation.name!r}: {err}") from err
