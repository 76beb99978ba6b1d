"""The data transforms (`transform:` of a source), one module per kind, each registering its entries in TRANSFORMS
(postrain.data.transforms.registry). Importing the package imports every module in it, so a new transform is a new
file here and nothing else."""

import importlib
import pkgutil

from postrain.data.transforms.registry import (TRANSFORMS, check_transform, given_params, keys_besides_fields,
                                               rows_per_row, transform_keys)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["TRANSFORMS", "check_transform", "given_params", "keys_besides_fields", "rows_per_row", "transform_keys"]
