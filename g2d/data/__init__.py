"""Datasets: every module in this package is imported so its dataset registers."""
import importlib
import pkgutil

_SKIP = {"base", "prepared", "standin", "standin_dataset", "raw"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _SKIP and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
