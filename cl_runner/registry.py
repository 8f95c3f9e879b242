"""Name -> object registries for methods, datasets and models (timm-style: a dict and a decorator).

Registry key = module file name = config file name; unknown names raise with the list of known ones.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .errors import ConfigError


class Registry(dict):
    def __init__(self, kind: str, package: str):
        super().__init__()
        self.kind, self.package = kind, package

    def register(self, name: str, schema: type | None = None) -> Callable:
        def deco(obj):
            if name in self:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice ({self[name]!r} and {obj!r})")
            obj.registry_name = name
            if schema is not None:  # else the object's own `schema` attribute (e.g. inherited) holds
                obj.schema = schema
            if getattr(obj, "schema", None) is None:
                raise RuntimeError(f"{self.kind} {name!r} has no config schema")
            self[name] = obj
            return obj

        return deco

    def get(self, name: str):  # type: ignore[override]
        self.load_all()
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self))}")
        return self[name]

    def load_all(self) -> None:
        # Importing the package imports every module in it, which runs their decorators.
        importlib.import_module(self.package)


METHODS = Registry("method", "cl_runner.methods")
DATASETS = Registry("dataset", "cl_runner.data")
MODELS = Registry("model", "cl_runner.models")
