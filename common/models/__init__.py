"""Reconstruction models: end-to-end U-Net and unrolled networks with data-consistency layers.

Every model maps ``(masked_kspace (B,C,H,W) complex, mask (B,1,H,W), sens_maps (B,C,H,W) complex)`` to a
magnitude image (B,H,W) at the full k-space size. Models are built by name so that the run config
(``model = "unet"``) selects them; the class defaults are sized for CPU training on small sites. Each
name's class is the one its entry in ``common.registry.MODEL_ENTRIES`` names (``implementation``): this
package holds no table of its own, so a model is its module plus its entry.
"""

import importlib
import inspect

from torch import nn

from common.errors import ConfigError
from common.models.unet import UnetRecon
from common.models.unrolled import UnrolledNet
from common.models.varnet import VarNet
from common.registry import MODEL_ENTRIES, MODELS

MODEL_NAMES: tuple[str, ...] = MODELS


def model_class(name: str) -> type[nn.Module]:
    """The class the registry entry of model ``name`` names, imported on first use.

    A name without an entry raises :class:`ConfigError`; an entry naming no ``nn.Module`` class is a
    programming error (``RuntimeError``).
    """
    entry = MODEL_ENTRIES.get(name)
    if entry is None:
        raise ConfigError(f"model: unknown model {name!r}; expected one of {', '.join(MODEL_ENTRIES)}")
    module, _, attribute = entry.implementation.partition(":")
    cls = getattr(importlib.import_module(module), attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RuntimeError(f"model {name!r}: implementation {entry.implementation!r} is not an nn.Module class")
    return cls


# Every built-in entry names a class that exists (a typo fails here, at import, not in a run).
for _name in MODELS:
    model_class(_name)


def build_model(name: str, *, source: str = "<model config>", **kwargs: object) -> nn.Module:
    """Build the model ``name`` with constructor ``kwargs`` (unset ones take the class defaults).

    Bad names, unknown keyword arguments and invalid values raise :class:`ConfigError` whose message
    starts with ``source`` (the config file the values came from) and the offending field.
    """
    if name not in MODEL_ENTRIES:
        raise ConfigError(f"{source}: model: unknown model {name!r}; expected one of {', '.join(MODEL_ENTRIES)}")
    cls = model_class(name)
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
    for name in MODEL_ENTRIES:
        if type(model) is model_class(name):
            return name
    raise ConfigError(f"model: {type(model).__name__} is no registered model; registered: {', '.join(MODEL_ENTRIES)}")


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters: the size of the weights exchanged with the server each round."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODEL_NAMES",
    "UnetRecon",
    "UnrolledNet",
    "VarNet",
    "build_model",
    "count_parameters",
    "model_class",
    "model_name",
]
