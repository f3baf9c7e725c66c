"""Our Orbax checkpoints as conversion sources: params directories and training checkpoints.

Parameters are restored one at a time (Orbax partial restore), so exporting never holds more than
one stacked parameter in memory besides the tensor being written.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from manager_jax import params_io
from manager_jax.config import ConfigError, ModelConfig
from tools.convert_weights import mapping
from tools.convert_weights.sources import ConversionError

CONVERSION_RECORD = "conversion.json"
SOURCE_CONFIG = "source_config.json"
TOKENIZER_DIR = "tokenizer"


class OrbaxSource:
    """A params directory or training checkpoint, validated against the mapping table."""

    def __init__(self, path: str, config: ModelConfig | None = None):
        self.path = path
        try:
            self.item, cfg_path = params_io.resolve_params_dir(path)
        except params_io.ParamsError as e:
            raise ConversionError(path, [str(e)]) from None
        self.root = os.path.dirname(self.item)
        if config is None:
            if cfg_path is None:
                raise ConversionError(path, [f"no config.json next to {self.item}"])
            try:
                config = ModelConfig.from_json_file(cfg_path)
            except (ConfigError, TypeError, ValueError, json.JSONDecodeError) as e:
                raise ConversionError(path, [f"{cfg_path}: {e}"]) from None
        self.config = config
        try:
            self.metadata = params_io.tree_metadata(self.item)
        except Exception as e:  # Orbax raises many kinds of errors for damaged checkpoints
            raise ConversionError(path, [f"cannot read the Orbax metadata of {self.item}: {e}"]) from None
        self.specs = mapping.param_specs(config)
        problems = params_io.check_tree(self.metadata, mapping.expected_tree(config))
        if problems:
            raise ConversionError(path, ["stored parameters disagree with config.json:"] + problems)
        self._cached: tuple[tuple, np.ndarray] | None = None
        self.record = self._read_json(CONVERSION_RECORD) or {}
        self.source_config = self._read_json(SOURCE_CONFIG)

    def _read_json(self, name: str) -> dict | None:
        for directory in (self.root, self.path):
            p = os.path.join(directory, name)
            if os.path.exists(p):
                with open(p) as f:
                    return json.load(f)
        return None

    def dtype(self, path: tuple) -> np.dtype:
        return np.dtype(mapping.get_path(self.metadata, path).dtype)

    def read(self, path: tuple) -> np.ndarray:
        """One parameter as numpy (the last one read stays cached: stacked layers are read in order)."""
        if self._cached is not None and self._cached[0] == path:
            return self._cached[1]
        self._cached = None  # release the previous parameter before loading the next
        target: dict = {}
        meta = mapping.get_path(self.metadata, path)
        mapping.set_path(target, path, jax.ShapeDtypeStruct(meta.shape, meta.dtype))
        tree = params_io.restore_tree(self.item, target, partial=True)
        value = mapping.get_path(tree, path)
        self._cached = (path, value)
        return value

    def release(self) -> None:
        self._cached = None

    def tokenizer_dir(self) -> str | None:
        for directory in (self.root, self.path):
            d = os.path.join(directory, TOKENIZER_DIR)
            if os.path.isdir(d):
                return d
        return None

    def describe(self) -> list[tuple[str, tuple, str]]:
        return [(".".join(str(p) for p in path), tuple(leaf.shape), np.dtype(leaf.dtype).name)
                for path, leaf in sorted(mapping.flatten(self.metadata).items(), key=lambda kv: str(kv[0]))]
