"""Name -> class registries for methods, datasets and method plug-ins.

Names are the single key used everywhere: params.yaml blocks, DVC stage names, report rows.
A duplicate name raises, so two files can never silently shadow each other.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

T = TypeVar("T")

_METHODS: dict[str, type] = {}
_DATASETS: dict[str, type] = {}
_PLUGINS: dict[str, Callable] = {}
_loaded = False


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _register(table: dict, kind: str, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
        if name in table and table[name] is not obj:
            raise RegistryError(f"duplicate {kind} name {name!r}: {table[name]!r} and {obj!r}")
        table[name] = obj
        try:
            obj.name = name  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
        return obj

    return deco


def register_method(name: str):
    return _register(_METHODS, "method", name)


def register_dataset(name: str):
    return _register(_DATASETS, "dataset", name)


def register_plugin(name: str):
    """A plug-in wraps any method: `get_method('joint+smp')` = plug-in 'smp' applied to 'joint'."""
    return _register(_PLUGINS, "plugin", name)


def load_all() -> None:
    """Import built-in modules and entry points so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("g2d.methods")
    importlib.import_module("g2d.data")
    importlib.import_module("baselines")
    for ep in entry_points(group="g2d.methods"):
        ep.load()


def import_extra(modules: list[str] | tuple[str, ...]) -> None:
    """Import user modules named in params.yaml (`extra_modules`) so their methods register."""
    for mod in modules:
        importlib.import_module(mod)


def list_methods() -> list[str]:
    load_all()
    return sorted(_METHODS)


def list_datasets() -> list[str]:
    load_all()
    return sorted(_DATASETS)


def list_plugins() -> list[str]:
    load_all()
    return sorted(_PLUGINS)


def get_method(name: str) -> type:
    """Resolve 'base' or 'base+plugin[+plugin]' to a method class."""
    load_all()
    if name in _METHODS:
        return _METHODS[name]
    base, *plugs = name.split("+")
    if plugs and base in _METHODS and all(p in _PLUGINS for p in plugs):
        cls = _METHODS[base]
        for p in plugs:
            cls = _PLUGINS[p](cls)
        _METHODS[name] = cls  # cache so the composed class is stable
        cls.name = name
        return cls
    valid = ", ".join(list_methods())
    plug = ", ".join(list_plugins()) or "none"
    raise RegistryError(f"unknown method {name!r}; valid methods: {valid} (plug-ins, as 'method+plugin': {plug})")


def get_dataset(name: str) -> type:
    load_all()
    if name not in _DATASETS:
        raise RegistryError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}")
    return _DATASETS[name]
