"""The readable pure-PyTorch path: the whole algorithm, and the oracle of the tests.

One op, one stem: reference/<op>.py defines the function <op>, and every such function is
exported here by that rule (a new op needs no line in this file); budget.py holds the
integer rules every backend shares (budget, cell_ids).
"""
import importlib
import pkgutil

from .budget import budget, cell_ids

__all__ = ["budget", "cell_ids"]
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "budget":
        globals()[_module.name] = getattr(importlib.import_module(f".{_module.name}", __name__), _module.name)
        __all__.append(_module.name)
__all__.sort()
