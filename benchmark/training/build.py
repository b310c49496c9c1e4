"""What one cell is made of: its device, model, method, optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from benchmark.errors import ConfigError
from benchmark.methods import METHODS, Method
from benchmark.models import FlexibleModel, IndependentModel, build_model


def pick_device(spec: str) -> torch.device:
    """`auto` -> cuda when available, else cpu. Raises ConfigError for cuda without CUDA."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device {spec!r} requested but CUDA is not available; use cpu")
    return dev


def make_model(cfg: dict[str, Any], num_classes: int, image_size: int) -> FlexibleModel:
    """The cell's network; the same seed gives the same initial weights for every method
    (separate networks included). Raises IncompatibleError when the method cannot train it."""
    torch.manual_seed(cfg["seed"])
    arch = {k: v for k, v in cfg["arch"].items() if k != "name"}
    model = build_model(cfg["arch"]["name"], arch, num_classes, image_size)
    method_cls = METHODS.get(cfg["method"]["name"])
    method_cls.check_model(model, cfg["arch"]["name"])
    method_cls.check_params(model, cfg["arch"]["name"], cfg["method"])
    if method_cls.separate_networks:
        model = IndependentModel(model)
    return model


def make_method(cfg: dict[str, Any], num_submodels: int) -> Method:
    """The cell's method, bound to its K sub-models (methods may own K-dependent parameters)."""
    params = {k: v for k, v in cfg["method"].items() if k != "name"}
    method = METHODS.get(cfg["method"]["name"])(params, cfg["train"]["label_smoothing"])
    method.bind(num_submodels)
    return method


def lr_at(t: dict[str, Any], epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at (epoch, step) of a stage: linear warm-up over `warmup_epochs` (from
    lr/(warmup x steps) to lr), then over the remaining epochs one of: `multistep` (x gamma at
    each milestone fraction of the epochs, MSDNet's CIFAR recipe), `cosine` (to 0), `exp` (x gamma
    every epoch, S-MobileNet's ImageNet `exp_decaying`, JiahuiYu/slimmable_networks) or `linear`
    (lowered by lr / remaining steps before every step, reaching 0 at the last one: US-Nets'
    `linear_decaying`, same code)."""
    pos = epoch + step / steps_per_epoch
    warm = t["warmup_epochs"]
    if warm and pos < warm:
        return t["lr"] * (pos + 1 / steps_per_epoch) / warm
    if t["schedule"] == "multistep":
        return t["lr"] * t["gamma"] ** sum(epoch >= m * t["epochs"] for m in t["milestones"])
    if t["schedule"] == "exp":
        return t["lr"] * t["gamma"] ** (epoch - warm)
    remaining = max(t["epochs"] - warm, 1e-9)
    if t["schedule"] == "linear":
        return t["lr"] * max(0.0, 1 - (pos - warm + 1 / steps_per_epoch) / remaining)
    return 0.5 * t["lr"] * (1 + math.cos(math.pi * (pos - warm) / remaining))


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that any submodule lists in its `no_weight_decay()` (timm's
    convention, e.g. {"pos_embed", "cls_token"} on a ViT), prefixed by that submodule's path."""
    names: set[str] = set()
    for path, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{path}.{n}" if path else n for n in listed())
    return names


def weight_groups(model: nn.Module, t: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's parameter groups, each with `lr_scale` 1. `train.weight_decay_on` = "all":
    one group (every parameter decays: SGD's and ViT-CIFAR's `torch.optim.Adam` use);
    "matrices": the decayed group, then (weight_decay 0) 1-D parameters (norm weights, biases)
    and those named by `no_decay_names`: timm `optim._param_groups.param_groups_weight_decay`,
    the rule DeiT's `create_optimizer` applies."""
    if t["weight_decay_on"] == "all":
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    skip = no_decay_names(model)
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    groups = [{"params": decay, "lr_scale": 1.0}]
    if plain:
        groups.append({"params": plain, "lr_scale": 1.0, "weight_decay": 0.0})
    return groups


def new_optimizer(model: FlexibleModel, method: Method, t: dict[str, Any]) -> torch.optim.Optimizer:
    """`train.optimizer` over the model's weights (`weight_groups`) and, in a last group, the
    method's own learned parameters (e.g. multi_teacher's teacher importance) at
    `param_lr_scale` x lr without weight decay. Each group carries `lr_scale`; the trainer sets
    lr = lr_at(...) x lr_scale every step. sgd: momentum, nesterov, L2 weight decay (MSDNet's
    recipe); adam: `torch.optim.Adam`, weight decay added to the gradient (ViT-CIFAR `main.py`
    `configure_optimizers`: Adam, lr 1e-3, betas (0.9, 0.999), wd 5e-5); adamw:
    `torch.optim.AdamW`, decoupled weight decay (Loshchilov & Hutter; DeiT's optimizer)."""
    groups = weight_groups(model, t)
    own = list(method.parameters())
    if own:
        groups.append({"params": own, "lr_scale": method.param_lr_scale, "weight_decay": 0.0})
    wd = t["weight_decay"]
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(
            groups, lr=t["lr"], momentum=t["momentum"], nesterov=t["nesterov"], weight_decay=wd
        )
    adam = torch.optim.Adam if t["optimizer"] == "adam" else torch.optim.AdamW
    return adam(groups, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=wd)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
