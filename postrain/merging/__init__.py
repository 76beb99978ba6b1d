"""Model merging with mergekit, driven by a plain dict: a recipe's ``merge:`` section *is* a mergekit YAML
configuration (``merge_method``, ``models`` or ``slices`` or ``modules``, ``base_model``, ``parameters``,
``dtype``/``out_dtype``, ``tokenizer_source``/``tokenizer``, ``chat_template``).

- :mod:`postrain.merging.references`: the walker over its model references and their resolution;
- :mod:`postrain.merging.validation`: checks beyond mergekit's schema, with errors that name the key path;
- :mod:`postrain.merging.run`: the merge itself, on CPU, through mergekit's Python API.
"""

from postrain.merging.references import MergeConfigError, model_references
from postrain.merging.run import run_mergekit
from postrain.merging.validation import merge_methods, validate_merge_config

__all__ = ["MergeConfigError", "merge_methods", "model_references", "run_mergekit", "validate_merge_config"]
