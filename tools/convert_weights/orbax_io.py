"""Our Orbax checkpoints as conversion sources: params directories and training checkpoints.

Parameters are read one layer at a time straight from the stored arrays (TensorStore), so
exporting holds about one tensor in memory besides the one being written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp

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
        self._cached: tuple | None = None  # (path, its TensorStore, first row of block, block)
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=True)
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

    def read(self, path: tuple, layer: int | None = None) -> np.ndarray:
        """One parameter as numpy, or with `layer` one row of its leading axis (a layer of a stacked
        parameter). Rows are read in blocks of the stored chunks' leading size, the last block
        cached: one layer per chunk (what to-orbax and training write) holds one layer in memory;
        a chunk spanning several layers (a training checkpoint written before stacked leaves were
        chunked per layer) is read once, not once per layer."""
        if self._cached is None or self._cached[0] != path:
            self._cached = None  # free the previous parameter before reading the next
            try:
                store = params_io.open_stored_array(self.item, path, self._context)
            except Exception as e:  # TensorStore raises ValueError / OSError kinds for damaged data
                # a damaged source is bad input (exit 2), as for `run.py generate`
                raise ConversionError(self.path, [f"cannot open parameter {params_io.dotted(path)} "
                                                  f"(damaged or unreadable): {e}"]) from None
            self._cached = (path, store, None, None)
        _, store, block_start, block = self._cached
        rows = max(1, int(store.chunk_layout.read_chunk.shape[0] or 1)) if store.ndim else 1
        start = 0 if layer is None else layer - layer % rows
        stop = store.shape[0] if layer is None or not store.ndim else min(start + rows, store.shape[0])
        if block_start != start or block is None or layer is None:
            try:
                block = np.asarray((store if layer is None else store[start:stop]).read().result())
            except Exception as e:
                where = params_io.dotted(path) + ("" if layer is None else f"[{layer}]")
                raise ConversionError(self.path, [f"cannot read parameter {where} (damaged or unreadable): {e}"]) from None
            self._cached = (path, store, start, block)
        return block if layer is None else block[layer - start]

    def release(self) -> None:
        self._cached = None

    def tokenizer_dir(self) -> str | None:
        for directory in (self.root, self.path):
            d = os.path.join(directory, TOKENIZER_DIR)
            if os.path.isdir(d):
                return d
        return None

    def describe(self) -> list[tuple[str, tuple, str]]:
        return [(params_io.dotted(path), tuple(leaf.shape), np.dtype(leaf.dtype).name)
                for path, leaf in sorted(mapping.flatten(self.metadata).items(), key=lambda kv: str(kv[0]))]
