"""Typed, validated training configurations.

A configuration is a YAML file whose keys mirror the dataclasses below. Loading
checks every key and value: a misspelled key is an error that names it and
suggests the closest valid key; a value of the wrong type or outside its range
is an error that names the key and the value.

``load_config(name_or_path, overrides)`` accepts a path or the bare name of a
packaged config (``asid_x2`` -> ``distillsr/configs/asid_x2.yaml``); overrides
are ``key.sub=value`` strings whose values are read as YAML.
A file may start from another with ``base: other_config`` (a packaged name or a
path relative to the file); its keys are merged over the base's.

The model section is checked against the registry: ``model.arch`` must be a
registered architecture, ``model.scale`` one of its scales and every
``model.options`` key a keyword its builder accepts. Packaged configs name no
data folder: ``data.root`` (``--data DIR``) must be given to train
(:func:`check_data_paths`), ``val.dir`` (``--val DIR``) to validate.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

__all__ = ["Config", "ModelConfig", "DataConfig", "ValConfig", "OptimConfig", "ScheduleConfig",
           "TrainConfig", "ConfigError", "load_config", "config_from_dict", "config_to_dict",
           "packaged_configs", "resolve_config_path", "check_data_paths", "model_options_accepted",
           "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""


@dataclass
class ModelConfig:
    arch: str = "asid"                     # a name from ``distillsr models``
    scale: int = 2                         # 2, 3 or 4 (what the architecture supports)
    options: Dict[str, Any] = field(default_factory=dict)  # passed to create_model


@dataclass
class DataConfig:
    kind: str = "div2k"        # div2k | hr_folder | paired
    root: str = ""             # div2k: folder holding DIV2K_<split>_HR; hr_folder/paired: the HR folder
    lr_root: str = ""          # paired: the LR folder (file names as the HR ones, or <stem>x<s>.<ext>)
    split: str = "train"       # div2k: DIV2K_<split>_HR and DIV2K_<split>_LR_bicubic/X<s>
    recursive: bool = False    # hr_folder/paired: also look in sub-folders
    patch_size: int = 64       # LR patch side; the HR patch is patch_size * scale
    batch_size: int = 16       # global batch (all processes together)
    flip: bool = True          # random horizontal / vertical flips
    rot90: bool = True         # random 90-degree rotations (transpose)
    repeat: int = 1            # one epoch = repeat x (number of images) patches
    cache: bool = True         # keep decoded images (and LR made on the fly) in memory
    num_workers: int = 2       # data loader processes per training process (0 = in-process)


@dataclass
class ValConfig:
    dir: str = ""              # benchmark set: <dir>/HR and <dir>/LR_bicubic/X<s>; "" = no validation
    every: int = 5000          # validate every N iterations (and at the end)
    max_images: int = 0        # 0 = all images of the set
    use_ema: bool = True       # validate (and keep as best) the EMA weights when EMA is on
    ssim: str = "matlab"       # SSIM variant reported: matlab (ASID's script) | wang (RFDN/FDIWN)


@dataclass
class OptimConfig:
    name: str = "adamw"        # adamw | adam
    lr: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0     # max global gradient norm; 0 = no clipping


@dataclass
class ScheduleConfig:
    name: str = "step"         # step | cosine | constant
    milestones: List[float] = field(default_factory=list)  # step: values < 1 are fractions of train.iters
    gamma: float = 0.5         # step: lr factor at each milestone
    warmup_iters: int = 0      # linear warm-up from lr/warmup_iters
    min_lr: float = 0.0        # cosine: final learning rate


@dataclass
class TrainConfig:
    iters: int = 1000
    loss: str = "l1"           # l1 | l2
    ema_decay: float = 0.0     # 0 = no EMA; e.g. 0.999
    amp: str = "none"          # none | bf16 | fp16 (fp16 needs CUDA)
    channels_last: bool = False
    compile: bool = False      # torch.compile the network
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    threads: int = 0           # torch intra-op threads per process; 0 = torch's default
    log_every: int = 100       # CSV / TensorBoard row every N iterations
    ckpt_every: int = 1000     # checkpoint every N iterations (and at the end)
    keep_ckpts: int = 3        # periodic checkpoints kept (older ones are deleted); 0 = keep all
    progress: str = "auto"     # auto (bar on a terminal, log lines otherwise) | bar | log | none
    tensorboard: bool = True   # write TensorBoard events when tensorboard is installed


@dataclass
class Config:
    name: str = ""             # run name; outputs go to <out_dir>/<name> (default: the config's file name)
    out_dir: str = "runs"
    seed: int = 0
    init_from: str = ""        # initialise the network from this checkpoint
    init_strict: bool = True   # false: load every tensor whose name and shape match, report the rest
    init_linear: bool = False  # ASID: fit the linear path by least squares on the training pairs first
    init_upsampler: bool = False  # ASID: fit the upsampler by least squares on the (init_from) body's features
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val: ValConfig = field(default_factory=ValConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_CHOICES = {
    "data.kind": ("div2k", "hr_folder", "paired"),
    "val.ssim": ("matlab", "wang"),
    "optim.name": ("adamw", "adam"),
    "sched.name": ("step", "cosine", "constant"),
    "train.loss": ("l1", "l2"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.progress": ("auto", "bar", "log", "none"),
}
_POSITIVE = {"model.scale", "data.patch_size", "data.batch_size", "data.repeat", "train.iters",
             "val.every", "train.log_every", "train.ckpt_every"}
_NON_NEGATIVE = {"data.num_workers", "val.max_images", "optim.lr", "optim.eps", "optim.weight_decay",
                 "optim.grad_clip", "sched.gamma", "sched.warmup_iters", "sched.min_lr", "train.threads",
                 "train.keep_ckpts", "train.ema_decay"}


# ----------------------------------------------------------------------------- dict -> dataclass

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; return it converted (e.g. '5e-4' -> 5e-4)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)  # YAML reads 5e-4 (no dot) as a string
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list, bool)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _unknown_key(key: str, valid: Sequence[str], prefix: str, source: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    where = f" in {source}" if source else ""
    return ConfigError(f"unknown config key '{full}'{where}{hint} (valid keys here: "
                       f"{', '.join(prefix + v for v in valid)})")


def _build(cls, data: Dict[str, Any], prefix: str, source: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        k = str(k)
        if k not in names:
            raise _unknown_key(k, names, prefix, source)
        tp = hints[k]
        if _is_dataclass_type(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.", source)
        else:
            kwargs[k] = _coerce(v, tp, f"{prefix}{k}")
    return cls(**kwargs)


def _check_values(cfg: Config) -> None:
    flat = _flatten(config_to_dict(cfg))
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(choices)}")
    for key in _POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]!r}")
    if not cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be < 1 (0 turns EMA off), got {cfg.train.ema_decay}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas}")
    for m in cfg.sched.milestones:
        if m <= 0 or (m >= 1 and m != int(m)):
            raise ConfigError(f"sched.milestones: {m} is neither a fraction in (0, 1) of train.iters "
                              f"nor a whole iteration number")
    if cfg.data.kind == "paired" and not cfg.data.lr_root:
        raise ConfigError("data.lr_root: needed when data.kind is 'paired'")
    if cfg.init_linear and cfg.init_upsampler:
        raise ConfigError("init_linear and init_upsampler: choose one (the linear init zeroes the body's path)")
    _check_model(cfg.model)


# ----------------------------------------------------------------------------- the model section

def _named_params(fn, skip: int) -> Tuple[List[str], bool]:
    """Keyword parameter names of ``fn`` after its first ``skip`` ones, and whether it takes ``**kwargs``."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def model_options_accepted(arch: str) -> Optional[List[str]]:
    """The option names the builder of ``arch`` accepts (``model.options``), or None when they
    cannot be known. A builder that passes ``**options`` on to the class it is annotated to
    return accepts that class's keyword arguments too."""
    from ..registry import model_info
    builder = model_info(arch).builder
    try:
        names, open_ended = _named_params(builder, 1)  # the first parameter is the scale
        if open_ended:
            ret = typing.get_type_hints(builder).get("return")
            if not (isinstance(ret, type) and ret.__init__ is not object.__init__):
                return None
            more, open_ended = _named_params(ret.__init__, 2)  # self, scale
            if open_ended:
                return None
            names += [n for n in more if n not in names]
    except (TypeError, ValueError, NameError):  # no signature to read
        return None
    return names


def _check_model(m: ModelConfig) -> None:
    from ..registry import list_models, model_info
    known = list_models()
    arch = m.arch.lower()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.arch: unknown architecture {m.arch!r}{hint} (known: {', '.join(known)})")
    scales = list(model_info(arch).scales)
    if m.scale not in scales:
        raise ConfigError(f"model.scale: {arch} supports x{', x'.join(map(str, scales))}, not x{m.scale}")
    accepted = model_options_accepted(arch)
    if accepted is None:
        return
    for key in m.options:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.5)
            hint = f"; did you mean 'model.options.{close[0]}'?" if close else ""
            raise ConfigError(f"model.options.{key}: {arch} has no option {key!r}{hint} "
                              f"(its options: {', '.join(accepted) or 'none'})")


def check_data_paths(cfg: Config) -> None:
    """The checks that need a run's data: the training images must be named (``data.root``;
    ``--data DIR`` on the command line; packaged configs name no data folder), and every data
    folder named must exist."""
    if not cfg.data.root.strip():
        what = {"div2k": "the folder holding DIV2K_<split>_HR", "hr_folder": "the folder of HR images",
                "paired": "the folder of HR images"}[cfg.data.kind]
        raise ConfigError(f"data.root is not set: give the training data ({what}) with --data DIR "
                          f"(or the override data.root=DIR)")
    folders = [("data.root", cfg.data.root, "--data DIR or "), ("val.dir", cfg.val.dir, "--val DIR or ")]
    if cfg.data.kind == "paired":
        folders.insert(1, ("data.lr_root", cfg.data.lr_root, ""))
    for key, value, flag in folders:
        if value and not Path(value).is_dir():
            raise ConfigError(f"{key} {value}: no such folder (set it with {flag}{key}=DIR)")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_from_dict(data: Dict[str, Any], source: str = "") -> Config:
    """Build and validate a :class:`Config` from a (nested) dict."""
    cfg = _build(Config, data, "", source)
    _check_values(cfg)
    return cfg


def config_to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- files and overrides

def packaged_configs() -> List[str]:
    """Names of the configs shipped with the package (usable as ``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: Union[str, Path], relative_to: Optional[Path] = None) -> Path:
    p = Path(name_or_path)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    if not p.suffix:
        candidates.append(p.with_suffix(".yaml"))
    if p.parent == Path("."):
        candidates.append(CONFIG_DIR / (p.name if p.suffix else p.name + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    close = difflib.get_close_matches(p.stem, packaged_configs(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"config {str(name_or_path)!r} not found: no such file and no packaged config of that "
                      f"name{hint} (packaged: {', '.join(packaged_configs())})")


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, _seen: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping at the top level")
    base = data.pop("base", None)
    if base:
        base_path = resolve_config_path(str(base), relative_to=path.parent)
        data = _deep_merge(_read_yaml(base_path, _seen + (path,)), data)
    return data


def parse_override(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.iters=1000)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _check_override_key(key: str, text: str) -> None:
    cls, prefix = Config, ""
    for part in key.split("."):
        if cls is None:  # inside a free-form mapping (model.options)
            return
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise _unknown_key(part, list(hints), prefix, f"override {text!r}")
        tp = hints[part]
        cls = tp if _is_dataclass_type(tp) else None
        if cls is None and typing.get_origin(tp) not in (dict, Dict) and part != key.split(".")[-1]:
            raise ConfigError(f"override {text!r}: '{prefix}{part}' is not a section")
        prefix += part + "."


def _set_path(data: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def load_config(name_or_path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a config file (or a packaged config by name), apply ``key=value`` overrides, validate."""
    data: Dict[str, Any] = {}
    source = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        data = _read_yaml(path)
        source = str(path)
        data.setdefault("name", path.stem)
    for text in overrides:
        key, value = parse_override(text)
        _check_override_key(key, text)
        _set_path(data, key, value)
    return config_from_dict(data, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
