"""Cell configuration: defaults, profiles, `--set` overrides, validation and the cell key.

A cell is (arch, dataset, method, seed, profile, overrides). Resolving it gives one nested dict
(the "resolved config") that is logged to MLflow as flattened params and hashed into the cell key.
A profile here sets the schedule, data and runtime; each architecture declares its own sizes and
training settings per profile where it is registered (`register_arch(profiles=, train=)`).
Precedence, lowest first: DEFAULTS < profile < the architecture's profile entry < `--set`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import yaml

from benchmark import data as datasets
from benchmark.data.autoaugment import check_policy
from benchmark.errors import ConfigError, got
from benchmark.methods import METHODS
from benchmark.methods.base import DIVERGENCE
from benchmark.models import ARCHS, ArchSpec, archs_having

DEFAULTS: dict[str, dict[str, Any]] = {
    # MSDNet's CIFAR recipe (reference code): SGD 0.1, momentum 0.9, wd 1e-4, batch 64,
    # 300 epochs, lr x0.1 at 50% and 75% of the epochs.
    "train": {
        "epochs": 300,
        "batch_size": 64,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 1e-4,
        "schedule": "multistep",
        "milestones": [0.5, 0.75],
        "gamma": 0.1,
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
        "eval_batch_size": 500,
        # BN recalibration before each sub-model's evaluation
        # (`benchmark.training.bn_calib`): that many training batches; 0 = none. Width networks
        # with shared BN set their own (us_mobilenet_v1).
        "bn_calib_batches": 0,
        # a distributed cell: BatchNorm statistics over the global batch (true) or per rank
        # (false, as the papers compute BN per GPU; docs/scaling.md)
        "sync_bn": False,
        # the optimizer (`benchmark.training.build.new_optimizer`): sgd (momentum, nesterov),
        # adam (L2 weight decay in the gradient: ViT-CIFAR's torch.optim.Adam) or adamw
        # (decoupled weight decay: DeiT's); betas for adam/adamw (torch's defaults, ViT-CIFAR's)
        "optimizer": "sgd",
        "betas": [0.9, 0.999],
        # which parameters weight decay applies to: all, or "matrices" (none on 1-D parameters:
        # norm weights and biases, nor on the model's `no_weight_decay()` names such as
        # pos-embed / cls-token: timm's `param_groups_weight_decay`, as DeiT trains)
        "weight_decay_on": "all",
        # an augmentation policy after the crop/flip, on the device (`benchmark.data.autoaugment`):
        # none | autoaugment_cifar10 (ViT-CIFAR's CIFAR10Policy)
        "augment_policy": "none",
    },
    "data": {
        "root": "./data",
        "download": False,
        "val_size": 5000,
        "train_subset": None,
        "test_subset": None,
        "split_seed": 0,
        "image_size": None,
        # auto: in memory when the decoded data fits half the free memory, else streamed
        # (benchmark.data.stream.choose_in_memory); true / false force it
        "in_memory": "auto",
    },
    "runtime": {
        "device": "auto",
        "amp": "auto",
        "compile": False,
        "memory_format": "auto",
        "threads": 0,
        "latency_batch": 1,
        "latency_warmup": 10,
        "latency_repeats": 50,
        # early-exit architectures (benchmark.training.early_exit): real early exiting at
        # batch 1 is timed over this many test images (0: not timed), at the thresholds fitted
        # on val for exit distribution q (auto: 1.0, the same share of samples at every exit)
        "early_exit_images": 1000,
        "early_exit_q": "auto",
        "log_every": 50,
        "workdir": "./flexbench_runs",
        "log_checkpoint": False,
        # ranks the cell runs on: set by the launcher (--nproc-per-node x --nnodes)
        "world_size": 1,
        # streamed data (benchmark.data.stream): DataLoader worker processes per process and
        # batches each prefetches (docs/data.md: measured on this 2-core CPU), decode on cpu | cuda
        "loader_workers": 2,
        "prefetch": 2,
        "decode": "cpu",
    },
}

# Where a cell's result does not depend on a key, it stays out of the cell key.
NON_SEMANTIC = {("data", "root"), ("data", "download"), ("data", "in_memory")}

# Keys added after cells were recorded, at the value that reproduces the earlier behaviour:
# left out of the cell key at that value, so a finished cell keeps its key (and resumes).
KEY_NEUTRAL: dict[tuple[str, str], Any] = {
    ("train", "bn_calib_batches"): 0,
    ("train", "sync_bn"): False,
    ("train", "optimizer"): "sgd",  # the ViT-on-CIFAR recipe's settings (issue 24)
    ("train", "betas"): [0.9, 0.999],
    ("train", "weight_decay_on"): "all",
    ("train", "augment_policy"): "none",
    ("arch", "ge"): False,  # msdnet's IMTA options, off: the MSDNet cells had before them
    ("arch", "isc"): False,
    ("arch", "variant"): "cifar",  # the ImageNet-size networks' switch (issue 22)
    ("arch", "block"): "basic",  # ddnn_resnet's ImageNet block; the CIFAR one is basic
    ("arch", "cascade"): False,  # Zero-Time-Waste's cascade (msdnet, byot_resnet, sdn), off
    ("arch", "resolutions"): [],  # the input-resolution axis (us_mobilenet_v1, issue 25), off
    ("method", "resolution"): "full",  # sandwich's drawn widths at the image size, as before
    **{("method", name): spec.default for name, spec in DIVERGENCE.items()},
}

PROFILES: dict[str, dict[str, Any]] = {
    "paper": {
        "description": "published schedules: MSDNet's CIFAR recipe for both families, full data",
    },
    "mini": {
        "description": "real CIFAR-10 subset, scaled-down models, minutes per cell on 2 CPU cores",
        "train": {
            "epochs": 8,
            "batch_size": 64,
            "lr": 0.05,
            "schedule": "cosine",
            "eval_batch_size": 500,
        },
        "data": {"val_size": 1000, "train_subset": 10000},
        # fp32 on any device: at mini size bf16 autocast's casts cost more than its matmuls
        # save on a CPU with native bf16 (AMD EPYC, AVX-512 BF16, 1 thread, fwd+bwd+SGD step,
        # batch 64: flex_vit 140 vs 231 ms, us_mobilenet_v1 229 vs 501 ms, ofa_mobilenet_v3
        # 1.6 vs 2.1 s; docs/profiles.md), while a ResNet-50 step at 224 px is 2.3x faster
        "runtime": {
            "amp": False,
            "latency_warmup": 3,
            "latency_repeats": 10,
            "log_every": 20,
            "early_exit_images": 200,
        },  # fmt: skip
    },
    "smoke": {
        "description": "seconds per cell on CPU: tiny models and data, for tests and demos",
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.1, "eval_batch_size": 256},
        "data": {"val_size": 100, "train_subset": 640, "test_subset": 200},
        "runtime": {
            "latency_warmup": 1,
            "latency_repeats": 3,
            "log_every": 5,
            "early_exit_images": 20,
        },  # fmt: skip
    },
    "imagenet": {
        "description": "ImageNet-size networks (224 px), each paper's ImageNet schedule, else "
        "torchvision's reference recipe; 50000 training images held out for validation",
        # torchvision references/classification (train.py defaults, the ResNet recipe): 90
        # epochs, batch 256 (8 GPUs x 32), SGD 0.1 momentum 0.9, wd 1e-4, lr x0.1 every 30
        # epochs; MSDNet's ImageNet run is the same (kalviny/MSDNet-PyTorch README, main.py).
        "train": {
            "epochs": 90,
            "batch_size": 256,
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "schedule": "multistep",
            "milestones": [1 / 3, 2 / 3],
            "gamma": 0.1,
            "eval_batch_size": 250,
        },
        # MSDNet holds out 50000 ImageNet training images (research/papers.md §3, --use-valid)
        "data": {"val_size": 50000},
        "runtime": {"latency_warmup": 5, "latency_repeats": 20, "log_every": 100},
    },
}

SECTIONS = ("arch", "method", "train", "data", "runtime")
# learning-rate schedules after the warm-up (benchmark.training.build.lr_at)
SCHEDULES = ("multistep", "cosine", "exp", "linear")
OPTIMIZERS = ("sgd", "adam", "adamw")  # benchmark.training.build.new_optimizer
WEIGHT_DECAY_ON = ("all", "matrices")


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(value: Any) -> Any:
    """The one reading of a value a user wrote (`--set`, grid files, study space files, exported
    best params), applied after YAML: PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as
    the string '1e-3' while `--set` users and YAML 1.2 mean the number 0.001. Such strings
    become floats, inside lists and mappings too; every other value is returned unchanged."""
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [parse_value(v) for v in value]
    if isinstance(value, dict):
        return {k: parse_value(v) for k, v in value.items()}
    return value


def parse_text(raw: str, where: str) -> Any:
    """A value typed on the command line, read as YAML then `parse_value`; `where` names it in
    the ConfigError raised for text that is not YAML."""
    try:
        return parse_value(yaml.safe_load(raw))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: cannot parse value: {exc}") from exc


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["train.epochs=3", "method.T=4"]` -> {"train.epochs": 3, "method.T": 4.0} (YAML values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"--set expects section.key=value with section in {', '.join(SECTIONS)}, "
                f"got {item!r}"
            )
        out[key.strip()] = parse_text(raw, f"--set {item!r}")
    return out


def _split_overrides(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in overrides.items():
        section, _, sub = key.partition(".")
        if section not in by_section or not sub:
            raise ConfigError(f"unknown setting {key!r}; sections: {', '.join(SECTIONS)}")
        by_section[section][sub] = parse_value(value)  # grid/study files: like --set
    return by_section


def _merge(base: dict[str, Any], extra: dict[str, Any], section: str) -> dict[str, Any]:
    unknown = sorted(set(extra) - set(base))
    if unknown:
        raise ConfigError(
            f"unknown {section} setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(base))}"
        )
    merged = dict(base)
    merged.update(extra)
    return merged


def _check(cond: bool, name: str, rule: str, value: Any) -> None:
    """ConfigError `<name> must be <rule>, got <value> (<type>)` unless `cond`."""
    if not cond:
        raise ConfigError(f"{name} must be {rule}, {got(value)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_train(t: dict[str, Any]) -> None:
    def check(key: str, cond: Any, rule: str) -> None:
        _check(bool(cond), f"train.{key}", rule, t[key])

    check("epochs", _is_int(t["epochs"]) and t["epochs"] >= 1, "an integer >= 1")
    check("batch_size", _is_int(t["batch_size"]) and t["batch_size"] >= 2, "an integer >= 2")
    check("lr", _is_num(t["lr"]) and t["lr"] > 0, "> 0")
    check("momentum", _is_num(t["momentum"]) and 0 <= t["momentum"] < 1, "in [0, 1)")
    check("nesterov", isinstance(t["nesterov"], bool), "true or false")
    check("weight_decay", _is_num(t["weight_decay"]) and t["weight_decay"] >= 0, ">= 0")
    if t["schedule"] not in SCHEDULES:
        raise ConfigError(f"train.schedule {t['schedule']!r}; valid: {', '.join(SCHEDULES)}")
    ms = t["milestones"]
    check(
        "milestones",
        isinstance(ms, list) and all(_is_num(m) and 0 < m <= 1 for m in ms) and ms == sorted(ms),
        "increasing fractions in (0, 1]",
    )
    check("gamma", _is_num(t["gamma"]) and 0 < t["gamma"] <= 1, "in (0, 1]")
    check(
        "warmup_epochs",
        _is_int(t["warmup_epochs"]) and 0 <= t["warmup_epochs"] < t["epochs"],
        f"an integer in [0, epochs={t['epochs']})",
    )
    ls = t["label_smoothing"]
    check("label_smoothing", _is_num(ls) and 0 <= ls < 1, "in [0, 1)")
    ebs = t["eval_batch_size"]
    check("eval_batch_size", _is_int(ebs) and ebs >= 1, "an integer >= 1")
    bcb = t["bn_calib_batches"]
    check("bn_calib_batches", _is_int(bcb) and bcb >= 0, "an integer >= 0 (0: no BN recalibration)")
    check("sync_bn", isinstance(t["sync_bn"], bool), "true or false")
    _validate_optimizer(t)
    check_policy(t["augment_policy"])


def _validate_optimizer(t: dict[str, Any]) -> None:
    """train.optimizer, train.betas, train.weight_decay_on; nesterov only with sgd."""
    opt, betas, on = t["optimizer"], t["betas"], t["weight_decay_on"]
    _check(opt in OPTIMIZERS, "train.optimizer", f"one of {', '.join(OPTIMIZERS)}", opt)
    pair = isinstance(betas, list) and len(betas) == 2
    _check(
        pair and all(_is_num(b) and 0 <= b < 1 for b in betas),
        "train.betas",
        "two numbers in [0, 1), e.g. [0.9, 0.999]",
        betas,
    )
    valid_on = ", ".join(WEIGHT_DECAY_ON)
    _check(on in WEIGHT_DECAY_ON, "train.weight_decay_on", f"one of {valid_on}", on)
    if t["nesterov"] and opt != "sgd":
        raise ConfigError(
            f"train.nesterov applies to train.optimizer sgd only, got optimizer {opt!r} with "
            f"nesterov true; valid: nesterov false, or optimizer sgd"
        )


def validate_runtime(r: dict[str, Any]) -> None:
    dev = str(r["device"])
    if not (dev in ("auto", "cpu") or dev.startswith("cuda")):
        raise ConfigError(f"runtime.device {dev!r}; valid: auto, cpu, cuda, cuda:N")
    for key in ("compile", "log_checkpoint"):
        _check(isinstance(r[key], bool), f"runtime.{key}", "true or false", r[key])
    amp, fmt = r["amp"], r["memory_format"]
    _check(isinstance(amp, bool) or amp == "auto", "runtime.amp", "auto, true or false", amp)
    formats = ("auto", "channels_last", "contiguous")
    _check(fmt in formats, "runtime.memory_format", "auto, channels_last or contiguous", fmt)
    for key in ("threads", "latency_warmup"):
        _check(_is_int(r[key]) and r[key] >= 0, f"runtime.{key}", "an integer >= 0", r[key])
    for key in ("latency_batch", "latency_repeats", "log_every", "world_size", "prefetch"):
        _check(_is_int(r[key]) and r[key] >= 1, f"runtime.{key}", "an integer >= 1", r[key])
    ee = r["early_exit_images"]
    _check(_is_int(ee) and ee >= 0, "runtime.early_exit_images", "an integer >= 0 (0: none)", ee)
    q = r["early_exit_q"]
    _check(q == "auto" or (_is_num(q) and q > 0), "runtime.early_exit_q", "auto or a number > 0", q)
    lw = r["loader_workers"]
    _check(_is_int(lw) and lw >= 0, "runtime.loader_workers", "an integer >= 0 (0: no workers)", lw)
    _check(r["decode"] in ("cpu", "cuda"), "runtime.decode", "cpu or cuda", r["decode"])


def validate_data(d: dict[str, Any]) -> None:
    im = d["in_memory"]
    _check(isinstance(im, bool) or im == "auto", "data.in_memory", "auto, true or false", im)


def resolve(
    arch: str,
    dataset: str,
    method: str,
    seed: int = 0,
    profile: str = "smoke",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full, validated config of one cell. Raises ConfigError with the valid choices."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    arch_spec = ARCHS.get(arch)
    method_cls = METHODS.get(method)
    datasets.parse_name(dataset)
    _check(_is_int(seed) and seed >= 0, "seed", "an integer >= 0", seed)
    _check_arch_profiles(arch_spec)
    prof = PROFILES[profile]
    sets = _split_overrides(overrides or {})
    cfg: dict[str, Any] = {}
    for section in ("train", "data", "runtime"):
        base = _merge(DEFAULTS[section], prof.get(section, {}), section)
        if section == "train":  # an architecture's own schedule within the profile
            base = _merge(base, arch_spec.train.get(profile, {}), section)
        cfg[section] = _merge(base, sets[section], section)
    # profile sizes <- settings the method needs on this architecture <- the user's
    needs = method_cls.ARCH_SETTINGS.get(arch, {})
    arch_over = {**arch_spec.profiles.get(profile, {}), **needs, **sets["arch"]}
    cfg["arch"] = {"name": arch, **arch_spec.resolve(arch_over)}
    cfg["method"] = {"name": method, **method_cls.resolve(sets["method"])}
    cfg["data"] = {"name": dataset, **cfg["data"]}
    cfg["seed"] = seed
    cfg["profile"] = profile
    validate_train(cfg["train"])
    validate_runtime(cfg["runtime"])
    validate_data(cfg["data"])
    _validate_arch(cfg)
    return cfg


def _check_arch_profiles(spec: ArchSpec) -> None:
    """An architecture's per-profile entries must name existing profiles (typos fail loudly)."""
    for what, table in (("profiles", spec.profiles), ("train", spec.train)):
        unknown = sorted(set(table) - set(PROFILES))
        if unknown:
            raise ConfigError(
                f"architecture {spec.name} declares {what} for unknown profile(s) "
                f"{', '.join(unknown)}; valid profiles: {', '.join(PROFILES)}"
            )


def _validate_arch(cfg: dict[str, Any]) -> None:
    """Build the model on the meta device (no memory, no init) so that bad architecture values,
    and methods that cannot train this architecture, fail at resolve time, i.e. before the first
    cell of a grid starts."""
    from benchmark.models import build_on_meta

    num_classes, image_size = datasets.describe(*datasets.cell_source(cfg))
    key = json.dumps([cfg["arch"], num_classes, image_size], sort_keys=True)
    model = _META_MODELS.get(key)
    if model is None:  # a grid resolves many cells of one architecture config: build it once
        params = {k: v for k, v in cfg["arch"].items() if k != "name"}
        model = build_on_meta(cfg["arch"]["name"], params, num_classes, image_size)
        _META_MODELS[key] = model
    if not model.submodels:
        raise ConfigError(
            f"architecture {cfg['arch']['name']} built no sub-models; check its arch.* settings"
        )
    method_cls = METHODS.get(cfg["method"]["name"])
    method_cls.check_model(model, cfg["arch"]["name"])
    method_cls.check_params(model, cfg["arch"]["name"], cfg["method"])
    _check_early_exit(cfg, model)
    if method_cls.owns_step and cfg["runtime"]["compile"]:
        raise ConfigError(
            f"method {cfg['method']['name']} runs its own training step, which torch.compile "
            f"does not wrap: runtime.compile must be false, {got(cfg['runtime']['compile'])}"
        )
    bcb = cfg["train"]["bn_calib_batches"]
    if model.caps.bn_recalibration and bcb < 1:
        raise ConfigError(
            f"architecture {cfg['arch']['name']} shares BatchNorm statistics across widths and "
            f"is evaluated after BN recalibration: train.bn_calib_batches must be >= 1, {got(bcb)}"
        )


def _check_early_exit(cfg: dict[str, Any], model: Any) -> None:
    """Thresholds (`runtime.early_exit_q` set) need sub-models that are exits of one pass."""
    q = cfg["runtime"]["early_exit_q"]
    if q == "auto" or model.caps.early_exit:
        return
    raise ConfigError(
        f"runtime.early_exit_q asks for early-exit thresholds, but architecture "
        f"{cfg['arch']['name']} has no exits of one pass; valid: auto, or a number > 0 with "
        f"architecture {' or '.join(archs_having('early_exit'))}, {got(q)}"
    )


# arch config -> its model on the meta device (no memory): `check_model` only reads structure
_META_MODELS: dict[str, Any] = {}


def cell_key(cfg: dict[str, Any]) -> str:
    """Stable hash of everything that determines a cell's result (not runtime or paths): a
    file-backed dataset enters by what it is (`datasets.identity`), not where it is."""
    semantic = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "runtime"}
    semantic["data"]["name"] = datasets.identity(cfg["data"]["name"])
    for section, key in NON_SEMANTIC:
        semantic[section].pop(key, None)
    for (section, key), neutral in KEY_NEUTRAL.items():
        if key in semantic.get(section, {}) and semantic[section][key] == neutral:
            del semantic[section][key]
    blob = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.1", ...} for MLflow params."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out
