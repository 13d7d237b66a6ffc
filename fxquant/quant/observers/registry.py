"""The observer registry: observer name -> class, filled by ``@register_observer`` in each module.

Every name a qconfig's ``observer_type`` accepts and ``make_observer`` builds comes from here,
so a new observer is one module::

    @register_observer("mine")
    class MineObserver(MinMaxObserver): ...

imported once (the built-in modules are imported by ``fxquant.quant.observers``). Its
distributed merge is looked up along the class hierarchy
(:func:`fxquant.quant.distributed.register_merge`), so a subclass of a built-in observer
that keeps its parent's state needs no merge of its own.
"""

from __future__ import annotations

import re
from typing import Callable

from fxquant.quant.observers.base import Observer, ObserverError
from fxquant.quant.spec import QuantSpec

__all__ = ["register_observer", "unregister_observer", "observer_class", "registered_observers", "make_observer"]

_REGISTRY: dict[str, type[Observer]] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_HOW = "register one with @fxquant.quant.observers.register_observer('name') on an Observer subclass"


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator: make an Observer subclass available as ``name``.

    ``name`` is lower case (a qconfig accepts it in any case, with or without an
    ``Observer`` suffix). A name registered twice or a class that is not an Observer is
    refused with ValueError / TypeError.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith("observer"):
        raise ValueError(
            f"observer name {name!r} is not allowed: use lower-case letters, digits and '_', starting "
            "with a letter and not ending in 'observer' (a qconfig adds that suffix itself), e.g. 'minmax'"
        )

    def decorate(cls: type[Observer]) -> type[Observer]:
        if not (isinstance(cls, type) and issubclass(cls, Observer)):
            raise TypeError(
                f"@register_observer({name!r}) decorates {cls!r}, which is not a subclass of "
                "fxquant.quant.observers.Observer"
            )
        if name in _REGISTRY:
            raise ValueError(
                f"observer name {name!r} is already registered for {_qualname(_REGISTRY[name])}; "
                f"cannot register {_qualname(cls)} under it too (pick another name, or "
                "unregister_observer the old one first)"
            )
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls

    return decorate


def unregister_observer(name: str) -> type[Observer]:
    """Remove ``name`` from the registry (e.g. a test's observer); returns its class."""
    cls = observer_class(name)
    del _REGISTRY[name]
    return cls


def observer_class(name: str) -> type[Observer]:
    """The class registered as ``name``; ObserverError listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ObserverError(
            f"no observer is registered as {name!r}; registered: {', '.join(registered_observers())}. "
            f"To add one, {_HOW} and import its module before use"
        ) from None


def registered_observers() -> tuple[str, ...]:
    """Every registered observer name, sorted."""
    return tuple(sorted(_REGISTRY))


def make_observer(
    spec: QuantSpec, *, axis: int | None = None, num_groups: int | None = None, name: str = "?"
) -> Observer:
    """The observer registered as ``spec.observer``, for the point ``name``."""
    return observer_class(spec.observer)(spec, axis=axis, num_groups=num_groups, name=name)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
