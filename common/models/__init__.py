"""Reconstruction models: end-to-end U-Net and unrolled networks with data-consistency layers.

Every model maps ``(masked_kspace (B,C,H,W) complex, mask (B,1,H,W), sens_maps (B,C,H,W) complex)`` to a
magnitude image (B,H,W) at the full k-space size. Models are built by name so that the run config
(``model = "unet"``) selects them; the class defaults are sized for CPU training on small sites.
"""

import inspect

from torch import nn

from common.errors import ConfigError
from common.models.unet import UnetRecon
from common.models.unrolled import UnrolledNet
from common.models.varnet import VarNet
from common.registry import MODELS, check_implemented

_REGISTRY: dict[str, type[nn.Module]] = {"unet": UnetRecon, "unrolled": UnrolledNet, "varnet": VarNet}

check_implemented("model", MODELS, _REGISTRY)
MODEL_NAMES: tuple[str, ...] = MODELS


def build_model(name: str, *, source: str = "<model config>", **kwargs: object) -> nn.Module:
    """Build the model ``name`` with constructor ``kwargs`` (unset ones take the class defaults).

    Bad names, unknown keyword arguments and invalid values raise :class:`ConfigError` whose message
    starts with ``source`` (the config file the values came from) and the offending field.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"{source}: model: unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    cls = _REGISTRY[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{source}: model.{unknown[0]}: not an option of model {name!r}; options are {', '.join(accepted)}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: model.{name}: {exc}") from exc


def model_name(model: nn.Module) -> str:
    """The registered name of ``model``'s class (the key of its facts in ``common.registry.MODEL_ENTRIES``)."""
    for name, cls in _REGISTRY.items():
        if type(model) is cls:
            return name
    raise ConfigError(f"model: {type(model).__name__} is no registered model; registered: {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters: the size of the weights exchanged with the server each round."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODEL_NAMES", "UnetRecon", "UnrolledNet", "VarNet", "build_model", "count_parameters", "model_name"]
