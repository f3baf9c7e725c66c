"""Inference: prefill with Manager injection, then KV-cache decoding in one compiled loop; scoring.

Layout of the KV cache (HF generation's left padding): every prompt ends at slot P-1, so all rows
write answer token i at the same slot P + i, with RoPE position n + i (positions are
cumsum(mask) - 1: 0..n-1 on the prompt's n real tokens). Padding slots have segment id 0; the
attention mask is by physical slot and segment id (`models/attention.py`), so they are never
attended.

The prefill itself runs on right-padded rows (the batch layout of `assemble_batch`): for the real
tokens that mask is exactly causal, so on GPU it takes the flash-attention path without an explicit
[B, P, P] mask even when the prompts differ in length. Its keys and values are then moved right by
P - n per row (one gather), which gives the left-padded cache above; RoPE is already applied to
the keys, so moving them changes nothing but their slot.

Shapes are bucketed (prompt length, number of new tokens, rows, crops, image tokens) so that a few
compiled programs serve every request: the prefill compiles once per (rows, prompt bucket, cache
length, crops, image tokens), the decode loop once per (rows, cache length, greedy or sampling).
Sampling knobs, max_new_tokens, eos ids and the vocabulary limit are traced values.

The decode loop is a `lax.while_loop` on device: no Python per token. It stops when every row has
produced an eos id or reached its own limit (max_new_tokens, or less where its prompt leaves less
room below max_length).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from manager_jax import host_threads, multigrid
from manager_jax.batch import IM_START_TOKEN_ID, ProcessedSample, assemble_batch
from manager_jax.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from manager_jax.data.image_processing import preprocess_image
from manager_jax.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    limit_vocab,
    row_keys,
    select_tokens,
    split_rows,
)
from manager_jax.models.attention import AttentionMesh, sharded_attention, splash_row_multiple
from manager_jax.models.decode_attention import KernelConfig
from manager_jax.models.decode_attention import available as decode_kernels_available
from manager_jax.models.decode_matmul import SITES as MATMUL_SITES
from manager_jax.models.decode_matmul import SPLIT_SITES
from manager_jax.models.decode_matmul import MatmulConfig
from manager_jax.models.layers import unstack_layers
from manager_jax.models.llava_ov import LlavaOV
from manager_jax.platform import target_platform

logger = logging.getLogger(__name__)
MAX_EOS_IDS = 8  # eos ids are padded to this many (-1) so their number never recompiles
# Arrays whose first axis is the batch row (sharded over the data axes on a mesh).
ROW_FIELDS = frozenset({"input_ids", "positions", "segment_ids", "labels", "query_mask", "kv_seg", "next_pos",
                        "lengths", "pred_pos", "targets", "valid"})


class InputError(ValueError):
    """A request the engine cannot serve (bad ids, images not matching the placeholders, ...)."""


class PromptTooLongError(InputError):
    """A prompt whose expanded length (text + image tokens) exceeds the model's maximum."""


@dataclass
class Prompt:
    """One request: token ids with one IMAGE_TOKEN_INDEX (-200) per image, and the PIL images."""

    ids: Sequence[int]
    images: Sequence[Image.Image] = ()


@dataclass
class Generation:
    """The generated ids (the eos id included when one ended the answer, as HF `generate` returns)."""

    token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    prompt_length: int  # tokens after image expansion


@dataclass
class ScoreRequest:
    """Score ids[target_start:target_end] (indices into the unexpanded `ids`) given what precedes."""

    ids: Sequence[int]
    target_start: int
    target_end: int
    images: Sequence[Image.Image] = ()


@dataclass
class ScoreResult:
    logprob: float  # sum of log p(token | prefix) over the target tokens
    num_tokens: int
    is_greedy: bool  # every target token is the argmax of its prediction


@dataclass
class PreparedBatch:
    """Numpy model inputs (right-padded rows, `assemble_batch`) and per-row bookkeeping."""

    inputs: dict[str, np.ndarray]
    lengths: np.ndarray  # [rows] expanded prompt lengths (0 for filler rows)
    num_prompts: int
    samples: list[ProcessedSample] = field(default_factory=list)

    @property
    def prompt_slots(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


# ---- buckets ------------------------------------------------------------------------------------


def length_bucket(n: int, minimum: int = 64) -> int:
    """Smallest of minimum * {1, 1.5, 2, 3, 4, 6, ...} that is >= n (at most a third wasted)."""
    size = max(int(minimum), 1)
    while True:
        for candidate in (size, size * 3 // 2):
            if candidate >= n:
                return candidate
        size *= 2


def count_bucket(n: int, step: int = 8) -> int:
    """0, then powers of two up to `step`, then multiples of `step` (crops: cost grows linearly)."""
    if n <= 0:
        return 0
    if n <= step:
        return 1 << (n - 1).bit_length()
    return math.ceil(n / step) * step


def rows_bucket(n: int) -> int:
    """Exact up to 4 rows (small batches are common and padded rows cost a full row), then powers of 2."""
    return n if n <= 4 else 1 << (n - 1).bit_length()


# XLA's command buffer types of jax 0.11 (the defaults, DebugOptions.xla_gpu_enable_command_buffer):
# a compile option replaces the whole list, so `WHILE` goes in with them.
XLA_COMMAND_BUFFER_DEFAULTS = ("FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL", "CUDNN", "DYNAMIC_SLICE_FUSION",
                               "CONDITIONAL")


# XLA's Triton fusions with several outputs ("unsupported": not on by default in XLA). In the decode
# step they let the kernel of a layer's last residual add (with the down projection's split-K sum)
# also compute the next layer's input RMSNorm: 22 kernels fewer per token for the 24-layer 0.5B
# model, at 2 and 16 rows (deviceless H100 compile, RESULTS.md session 22).
MULTI_OUTPUT_FUSION = "xla_gpu_unsupported_enable_triton_multi_output_fusion"


def decode_compiler_options(command_buffers: bool, multi_output_fusion: bool = False,
                            more: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The decode loop's XLA options. On GPU: with `command_buffers` the loops join the CUDA graphs
    (InferenceEngine decode_command_buffers), unless XLA_FLAGS sets the command buffer types itself;
    with `multi_output_fusion` each layer's residual add joins the next layer's RMSNorm kernel
    (InferenceEngine decode_multi_output_fusion). `more` (InferenceEngine decode_xla_options) on
    every platform, over the engine's own."""
    options: dict[str, Any] = {}
    if target_platform() == "gpu":
        if command_buffers and "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
            options["xla_gpu_enable_command_buffer"] = ",".join((*XLA_COMMAND_BUFFER_DEFAULTS, "WHILE"))
        if multi_output_fusion:
            options[MULTI_OUTPUT_FUSION] = True
    options.update(more or {})
    return options or None


def parse_xla_options(items: Sequence[str]) -> dict[str, bool | int | float | str]:
    """["KEY=VALUE", ...] (command lines) -> XLA options: true / false -> bool, numbers -> int or
    float, anything else a string. ValueError names an item without "=" or a key that is no XLA
    option name."""
    options: dict[str, bool | int | float | str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"xla_[a-z0-9_]+", key):
            raise ValueError(f"XLA option {item!r}: expected KEY=VALUE with KEY an XLA option name "
                             "(xla_...), e.g. xla_gpu_exhaustive_tiling_search=true")
        value: bool | int | float | str = text.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
        options[key] = value
    return options


# ---- the engine ---------------------------------------------------------------------------------


class InferenceEngine:
    """Generation and scoring for one `LlavaOV` model.

    Args:
      model: the model (its config decides image modes, conventions and the Manager).
      eos_ids: generation stops on any of these (the checkpoint's generation_config eos ids).
      pad_id: id written on padding and after an answer ended.
      im_start_id: `<|im_start|>` id (the adaptive Manager's query rule).
      vocab_limit: ids >= this are never produced nor counted (None = the whole vocabulary).
      max_length: longest expanded prompt + answer (default: the model's max_position_embeddings).
      mesh: a `jax.sharding.Mesh` with the axes of `manager_jax.sharding` to shard the parameters
        (FSDP / tensor) and the batch and KV cache (data); None = one device.
      min_prompt_bucket / min_new_bucket: smallest prompt-length / new-token buckets.
      decode_scan_layers: False (default) runs each decode step's decoder layers unrolled: one
        flat program per token, no per-layer loop inside the token loop (the usual serving choice;
        a loop iteration can cost as much as a small layer at batch 1). The layers are sliced out
        of the weight stacks once per decode call, so the decoder's weights are held twice while
        decoding. True scans them: a smaller program that compiles faster and needs no second
        copy (for a model that only just fits). Prefill and scoring follow the model's `scan_layers`.
      decode_min_rows: decode at least this many rows, repeating the last one (prefill is not
        affected); None = 2 on GPU, 1 elsewhere. On GPU, XLA rewrites a one-row matmul whose weights
        are small ((M + N) * K < 10M elements: every layer matrix of Qwen2-0.5B) into a multiply and a
        column reduction. In the batch-1 profile those took about 1.0 of the 1.76 ms per token,
        while the batch-16 decode's matmuls (Triton GEMMs) over the same weights took 0.32 ms per
        token (RESULTS.md, H100). With two rows the matmuls stay matmuls.
      decode_attention: the decode steps' attention block: "xla", "pallas" (two GPU kernels per
        layer for what XLA runs in seven, models/decode_attention.py: biases, RoPE, cache write and
        attention; no fp32 scores in memory, blocks of prompt padding not read) or "auto" (default:
        "pallas" for the unrolled decode on GPUs, "xla" elsewhere; on an H100 the kernels
        decode 986 vs 793 tokens/s at batch 1 and 12,005 vs 7,853 at batch 16, RESULTS.md). A
        layer whose cache or heads the kernels cannot take (heads under 32 or not a power of two)
        runs XLA's. On a mesh each device runs them on its rows and KV heads, where the cache
        keeps them (a shard_map). "pallas" needs the unrolled decode; off the GPU it runs in
        Pallas interpret mode (tests).
      decode_check_every: the decode loop runs fixed runs of this many tokens between its checks
        for the end (every row done, or max_new reached), then single tokens for the rest. A run
        is that many token steps unrolled in one loop iteration: a longer decode program to
        compile. On GPU a loop that tests a device value copies it to the host and waits for the
        device every iteration (one idle gap per token in the batch-1 profile), so the default
        there is 8; elsewhere (TPU, CPU) the loop runs on the device and the default is 1, every
        token. Rows that end inside a run get padding, as after any end; the tokens do not depend
        on this value, at most `decode_check_every - 1` steps are computed after the last row
        ended.
      decode_command_buffers: compile the decode loop with its loops in XLA's command buffers (CUDA
        graphs): the loop conditions are then tested on the GPU, with no copy to the host and wait
        per run of `decode_check_every` tokens (about 0.3 ms each on an H200). The one program's
        kernels are already in CUDA graphs by default; this adds the loops around them (XLA's
        `WHILE` command; `XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE` for every program).
        GPU only (elsewhere the loops run on the device already; the option does nothing there); an
        `xla_gpu_enable_command_buffer` in XLA_FLAGS takes precedence. Off by default until timed
        at both batch sizes (RESULTS.md, session 19). Speed only: the same tokens.
      decode_multi_output_fusion: compile the decode loop with XLA's multi-output Triton fusions
        (`MULTI_OUTPUT_FUSION`): each layer's residual add and the next layer's RMSNorm become one
        kernel (about 9 kernels per layer instead of 10). GPU only (a no-op elsewhere). Off by
        default until timed: the merged kernel runs one program per row where the add ran many,
        and the split-K sum moves into Triton code (benchmarks/generate.py's tokens_sha1 tells
        whether the tokens stay the same).
      decode_kernels: how the Pallas kernels divide the work, by the rows decoded together
        ({rows: KernelConfig}, rows of the whole batch; rows not listed get
        `KernelConfig.default_for(rows)`). On a mesh a device holds fewer rows and heads: time
        configs for those. Speed only: every config gives the same tokens.
        benchmarks/decode_attention.py times configs and prints the fastest per row count in the
        form `parse_kernel_configs` reads.
      decode_matmul: the decode steps' projections: "xla" (default) or "pallas" (four GPU kernels
        per layer, models/decode_matmul.py, with the two norms, the residual adds and the gate
        fused in: with the attention kernels, six kernels per layer where XLA runs about ten;
        on an H200 0.77x XLA's tokens per second, RESULTS.md session 18, so not the default).
        Needs decode_attention="pallas"; on a mesh of several devices the layers run XLA's.
      decode_matmul_kernels: {site: MatmulConfig} for the projections ("qkv", "o", "gate_up",
        "down") not on `MatmulConfig()`; benchmarks/decode_matmul.py times them and prints the
        fastest in the form `parse_matmul_configs` reads. Speed only.
      decode_xla_options: more XLA options for the decode loop's program alone, on any platform
        (over the engine's own), e.g. {"xla_gpu_exhaustive_tiling_search": True}: the autotuner
        searches every GEMM tiling of the decode step's few small matmul shapes, without paying
        for the prefill's large ones (`XLA_FLAGS` sets an option for every program). For
        experiments (benchmarks/generate.py --decode-xla-option); an unknown name fails the
        decode program's compile with XLA's "No such compile option".
    """

    def __init__(
        self,
        model: LlavaOV,
        *,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        im_start_id: int = IM_START_TOKEN_ID,
        vocab_limit: int | None = None,
        max_length: int | None = None,
        mesh=None,
        min_prompt_bucket: int = 64,
        min_new_bucket: int = 16,
        decode_scan_layers: bool = False,
        decode_min_rows: int | None = None,
        decode_attention: str = "auto",
        decode_kernels: Mapping[int, KernelConfig] | None = None,
        decode_check_every: int | None = None,
        decode_matmul: str = "xla",
        decode_matmul_kernels: Mapping[str, MatmulConfig] | None = None,
        decode_command_buffers: bool = False,
        decode_multi_output_fusion: bool = False,
        decode_xla_options: Mapping[str, Any] | None = None,
    ):
        self.cfg = model.cfg
        self.decode_scan_layers = bool(decode_scan_layers)
        if decode_min_rows is None:
            decode_min_rows = 2 if target_platform() == "gpu" else 1
        if decode_min_rows < 1:
            raise ValueError(f"decode_min_rows must be >= 1, got {decode_min_rows}")
        self.decode_min_rows = int(decode_min_rows)
        if decode_check_every is None:
            decode_check_every = 8 if target_platform() == "gpu" else 1
        if decode_check_every < 1:
            raise ValueError(f"decode_check_every must be >= 1, got {decode_check_every}")
        self.decode_check_every = int(decode_check_every)
        if decode_attention not in ("auto", "xla", "pallas"):
            raise ValueError(f"decode_attention must be 'auto', 'xla' or 'pallas', got {decode_attention!r}")
        if decode_attention == "auto":
            on_gpu = target_platform() == "gpu" and decode_kernels_available()
            decode_attention = "pallas" if on_gpu and not self.decode_scan_layers else "xla"
        if decode_attention == "pallas":
            if self.decode_scan_layers:
                raise ValueError("decode_attention='pallas' needs the unrolled decode (decode_scan_layers=False)")
            if target_platform() not in ("gpu", "cpu"):
                raise ValueError(f"decode_attention='pallas' is a GPU kernel; the backend is {target_platform()}")
        self.decode_attention = decode_attention
        decode_kernels = dict(decode_kernels or {})
        for rows, config in decode_kernels.items():
            if not (isinstance(rows, (int, np.integer)) and rows >= 1 and isinstance(config, KernelConfig)):
                raise ValueError(f"decode_kernels maps rows (>= 1) to KernelConfig; got {rows!r}: {config!r}")
        self.decode_kernels = tuple(sorted((int(r), c) for r, c in decode_kernels.items()))
        if decode_matmul not in ("xla", "pallas"):
            raise ValueError(f"decode_matmul must be 'xla' or 'pallas', got {decode_matmul!r}")
        if decode_matmul == "pallas" and decode_attention != "pallas":
            raise ValueError("decode_matmul='pallas' runs with the attention kernels: it needs decode_attention='pallas' "
                             f"(here {decode_attention!r})")
        self.decode_matmul = decode_matmul
        matmul_kernels = dict(decode_matmul_kernels or {})
        for site, config in matmul_kernels.items():
            if site not in MATMUL_SITES or not isinstance(config, MatmulConfig):
                raise ValueError(f"decode_matmul_kernels maps one of {MATMUL_SITES} to MatmulConfig; got {site!r}: {config!r}")
            if config.splits > 1 and site not in SPLIT_SITES:
                raise ValueError(f"decode_matmul_kernels: splits of the input are for {SPLIT_SITES} only; got {site!r}: {config}")
        self.decode_matmul_kernels = tuple(sorted(matmul_kernels.items()))
        if len(eos_ids) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} eos ids are supported, got {list(eos_ids)}")
        self.eos_ids = [int(e) for e in eos_ids]
        self.pad_id = int(pad_id)
        self.im_start_id = int(im_start_id)
        if vocab_limit is not None and int(vocab_limit) < 1:
            raise ValueError(f"vocab_limit must be >= 1 (None: the whole vocabulary), got {vocab_limit}")
        self.vocab_limit = int(vocab_limit) if vocab_limit is not None else None
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1 (None: the model's max_position_embeddings), got {max_length}")
        self.max_length = int(max_length) if max_length is not None else self.cfg.text.max_position_embeddings
        if self.max_length > self.cfg.text.max_position_embeddings:  # allowed, as HF runs on past them
            logger.warning("max_length %d is past the %d positions the model was trained for: answers there may "
                           "degrade", self.max_length, self.cfg.text.max_position_embeddings)
        # How errors name the limit: the caller's max_length, or the model's own.
        self._max_length_name = "the max_length" if max_length is not None else "the model maximum"
        self.min_prompt_bucket = min_prompt_bucket
        self.min_new_bucket = min_new_bucket
        self.mesh = mesh
        self._attention = self._attention_mesh(mesh)
        with sharded_attention(self._attention):
            # Prompt rows the Splash kernel takes (`attention_impl` splash, or auto on TPU):
            # explicit "splash" refuses other lengths, "auto" would run them on the XLA path.
            self._row_multiple = splash_row_multiple(self.cfg.attention_impl)
        self.graphdef, state = nnx.split(model)
        # The decode steps' own graph: the same params with the decoder's layer loop as asked.
        layers, attn = model.text.layers, model.text.layers.attn
        saved = (model.text.scan_layers, attn.decode_impl, attn.decode_kernels, layers.decode_matmul,
                 layers.decode_matmul_kernels)
        (model.text.scan_layers, attn.decode_impl, attn.decode_kernels, layers.decode_matmul,
         layers.decode_matmul_kernels) = (self.decode_scan_layers, decode_attention, self.decode_kernels,
                                          self.decode_matmul, self.decode_matmul_kernels)
        self.decode_graphdef = nnx.split(model)[0]
        (model.text.scan_layers, attn.decode_impl, attn.decode_kernels, layers.decode_matmul,
         layers.decode_matmul_kernels) = saved
        self.state = self._place_params(state)
        self._prefill_jit = jax.jit(self._prefill_fn, static_argnames=("cache_len", "plain_causal"))
        self._step_jit = jax.jit(self._decode_step_fn, donate_argnames=("cache",))
        self.decode_xla_options = dict(decode_xla_options or {})
        decode_options = decode_compiler_options(bool(decode_command_buffers), bool(decode_multi_output_fusion),
                                                 self.decode_xla_options)
        # What was asked for and is in effect here.
        self.decode_command_buffers = "xla_gpu_enable_command_buffer" in (decode_options or {})
        self.decode_multi_output_fusion = bool((decode_options or {}).get(MULTI_OUTPUT_FUSION))
        self._decode_jit = jax.jit(self._decode_loop_fn, static_argnames=("greedy", "new_slots"),
                                   donate_argnames=("cache",), compiler_options=decode_options)
        self._score_jit = jax.jit(self._score_fn, static_argnames=("plain_causal",))
        # Tokens per row the last decode loop made (the prefill's first included): where it stopped,
        # for benchmarks and tests (the loop ends when every prompt's answer has, or at max_new).
        self.last_decode_steps: int | None = None

    def _prompt_bucket(self, n: int) -> int:
        bucket = length_bucket(n, self.min_prompt_bucket)
        return -(-bucket // self._row_multiple) * self._row_multiple

    @staticmethod
    def _attention_mesh(mesh) -> AttentionMesh:
        """Where prefill and scoring attention runs (the Splash kernel on TPU, models/attention.py)."""
        from jax.sharding import Mesh

        from manager_jax.sharding import BATCH_AXES, MESH_AXES

        if mesh is None:
            return AttentionMesh(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES))
        rows = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
        return AttentionMesh(mesh, row_axes=rows or None)

    # ---- placement ------------------------------------------------------------------------
    def _place_params(self, state):
        if self.mesh is None:
            return state
        from manager_jax.sharding import ShardingError, check_fsdp_divides, heads_split_mid_head, tree_shardings

        def place(leaf, sharding):  # abstract params (an nnx.eval_shape model) get their sharding
            if isinstance(leaf, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
            return jax.device_put(leaf, sharding)

        pure = nnx.to_pure_dict(state)
        try:  # an fsdp axis that splits nothing would keep a whole copy of the weights per device
            check_fsdp_divides(pure, self.mesh, remedy="use --mesh data={data},fsdp={fsdp}",
                               training=False)
        except ShardingError as err:
            raise InputError(str(err)) from None
        if warning := heads_split_mid_head(self.cfg, self.mesh):
            logger.warning("%s (--mesh tensor=...)", warning)
        placed = jax.tree_util.tree_map(place, pure, tree_shardings(pure, self.mesh))
        nnx.replace_by_pure_dict(state, placed)
        return state

    def _batch_spec(self, ndim: int, rows: int):
        """Sharding of an array whose first axis is the batch rows (replicated if rows don't divide)."""
        if self.mesh is None:
            return None
        from manager_jax.sharding import BATCH_AXES

        axes = tuple(a for a in BATCH_AXES if self.mesh.shape.get(a, 1) > 1)
        size = math.prod(self.mesh.shape[a] for a in axes) if axes else 1
        first = axes if axes and rows % size == 0 else None
        return NamedSharding(self.mesh, PartitionSpec(first, *([None] * (ndim - 1))))

    def _cache_spec(self, rows: int):
        if self.mesh is None:
            return None
        # [L, B, S, KV, d]: rows over the data axes, KV heads over tensor (as the k/v projections).
        batch = self._batch_spec(5, rows).spec[0]
        tensor = self.mesh.shape.get("tensor", 1)
        kv = "tensor" if tensor > 1 and self.cfg.text.num_kv_heads % tensor == 0 else None
        return NamedSharding(self.mesh, PartitionSpec(None, batch, None, kv, None))

    def _input_sharding(self, name: str, ndim: int, rows: int):
        """Per-row fields are split over the data axes, the others replicated (None: one device)."""
        return self._batch_spec(ndim, rows) if name in ROW_FIELDS else self._replicated()

    def _put(self, inputs: dict, rows: int) -> dict[str, jax.Array]:
        """Host (or device) arrays -> device arrays, placed by `_input_sharding`."""
        out = {}
        for name, value in inputs.items():
            if not isinstance(value, jax.Array):
                value = np.asarray(value)
            spec = self._input_sharding(name, value.ndim, rows)
            out[name] = jax.device_put(value, spec) if spec is not None else jnp.asarray(value)
        return out

    def _abstract(self, inputs: dict, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        """What `_put` would make of `inputs`, without data (ahead-of-time compilation)."""
        def one(name, value):
            value = value if hasattr(value, "dtype") else np.asarray(value)  # arrays and their shapes
            return jax.ShapeDtypeStruct(value.shape, value.dtype,
                                        sharding=self._input_sharding(name, len(value.shape), rows))

        return {name: one(name, value) for name, value in inputs.items()}

    def _rows(self, prompts: int) -> int:
        """Rows of a batch of `prompts`: `rows_bucket`, then on a mesh a multiple of the devices the
        rows are split over (data x fsdp), so that each row and its KV cache are on one of them
        (`_batch_spec` replicates rows it cannot split: every device held every row's cache)."""
        rows = rows_bucket(prompts)
        if self.mesh is None:
            return rows
        from manager_jax.sharding import data_parallel_size

        return -(-rows // data_parallel_size(self.mesh)) * data_parallel_size(self.mesh)

    def _replicated(self):
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def _on_every_process(self, *results):
        """Small results replicated over the mesh, so every process can read them (rows split over
        the data axes of a multi-process mesh would otherwise live partly on other hosts)."""
        if self.mesh is None:
            return results
        return tuple(jax.lax.with_sharding_constraint(r, self._replicated()) for r in results)

    # ---- batch building -------------------------------------------------------------------
    def image_mode(self, n_images: int) -> str:
        """Several images in one prompt use pad mode, as the original evaluation does (SPEC §7.2)."""
        return "pad" if n_images > 1 else self.cfg.image.aspect_ratio

    def _image_options(self, n_images: int) -> dict:
        """How this model plans and crops the images of a prompt with `n_images` images."""
        return dict(mode=self.image_mode(n_images), pinpoints=self.cfg.image.grid_pinpoints,
                    convention=self.cfg.image.convention,
                    grid_type=self.cfg.manager.grid_type if self.cfg.manager.enabled else None,
                    unpad=self.cfg.image.has_newline)

    def _checked_ids(self, ids: Sequence[int], n_images: int, name: str) -> np.ndarray:
        ids = np.asarray(list(ids), np.int32)
        if ids.ndim != 1 or ids.size == 0:
            raise InputError(f"prompt {name}: needs at least one token id")
        n_sentinels = int((ids == IMAGE_TOKEN_INDEX).sum())
        if n_sentinels != n_images:
            raise InputError(f"prompt {name}: {n_sentinels} image placeholders but {n_images} images")
        bad = ids[(ids != IMAGE_TOKEN_INDEX) & ((ids < 0) | (ids >= self.cfg.text.vocab_size))]
        if bad.size:
            raise InputError(f"prompt {name}: token id {int(bad[0])} outside the model vocabulary "
                             f"(size {self.cfg.text.vocab_size})")
        return ids

    def _check_length(self, name: str, num_ids: int, image_tokens: Sequence[int]) -> None:
        expanded = num_ids - len(image_tokens) + sum(image_tokens)
        if expanded > self.max_length:
            raise PromptTooLongError(
                f"prompt {name} has {expanded} tokens after image expansion "
                f"({num_ids - len(image_tokens)} text + {sum(image_tokens)} image tokens), more than "
                f"{self._max_length_name} of {self.max_length}"
            )

    def check_prompt(self, ids: Sequence[int], image_sizes: Sequence[tuple[int, int]], name: str) -> None:
        """The checks of `process` (placeholders, ids, length after image expansion) and `generate`'s
        room for an answer, from the images' sizes (W, H) alone: no pixels, so a whole prompt file
        can be checked before generating."""
        ids = self._checked_ids(ids, len(image_sizes), name)
        options = self._image_options(len(image_sizes))
        tokens = [multigrid.plan_image(tuple(size), **options).num_tokens for size in image_sizes]
        self._check_length(name, len(ids), tokens)
        expanded = len(ids) - len(tokens) + sum(tokens)
        if expanded >= self.max_length:
            raise PromptTooLongError(f"prompt {name} has {expanded} tokens after image expansion, filling "
                                     f"{self._max_length_name} of {self.max_length}: no room to generate")

    def process(self, ids: Sequence[int], images: Sequence[Image.Image], name: str) -> ProcessedSample:
        """Preprocess one prompt's images and pair them with its ids."""
        ids = self._checked_ids(ids, len(images), name)
        options = self._image_options(len(images))
        pixels, plans = [], []
        for image in images:
            px, plan = preprocess_image(image, **options)
            pixels.append(px)
            plans.append(plan)
        side = self.cfg.vision.image_size
        px = np.concatenate(pixels) if pixels else np.zeros((0, side, side, 3), np.uint8)
        labels = np.full(ids.shape, IGNORE_INDEX, np.int32)
        sample = ProcessedSample(name, ids, labels, px, plans)
        self._check_length(name, len(ids), [p.num_tokens for p in plans])
        return sample

    def _assemble(self, samples: list[ProcessedSample], seq_len: int, rows: int):
        crops = count_bucket(sum(s.num_crops for s in samples))
        tokens = sum(s.num_image_tokens for s in samples)
        tokens = length_bucket(tokens, 256) if tokens else 0
        return assemble_batch(
            samples, rows=rows, seq_len=seq_len, max_crops=crops, max_image_tokens=tokens, pack=False,
            grid_type=self.cfg.manager.grid_type if self.cfg.manager.enabled else None,
            query_type=self.cfg.manager.query_type, truncate=False, pad_id=self.pad_id,
            im_start_id=self.im_start_id,
        )

    def _model_inputs(self, batch) -> dict[str, np.ndarray]:
        # Crops in the model's dtype: the tower casts to it anyway, and a bf16 model's prefill
        # copies half the bytes to the device.
        return batch.to_model_inputs(pixel_dtype=np.dtype(jnp.dtype(self.cfg.dtype)))

    def prepare(self, prompts: Sequence[Prompt]) -> PreparedBatch:
        """Prompts -> a right-padded, bucketed batch (numpy)."""
        if not prompts:
            raise InputError("no prompts given")
        process = lambda item: self.process(item[1].ids, item[1].images, str(item[0]))
        # The prompts' images are decoded and resized on the host's threads (PIL releases the GIL):
        # about 60 ms an image of a photo's size, more than a batch's prefill. Serially when an
        # image object appears twice: PIL's lazy loading of one image is not thread-safe.
        images = [id(image) for p in prompts for image in p.images]
        if len(prompts) > 1 and host_threads.size() > 1 and len(set(images)) == len(images):
            samples = list(host_threads.pool().map(process, enumerate(prompts)))  # the first error in prompt order
        else:
            samples = [process(item) for item in enumerate(prompts)]
        lengths = np.zeros(self._rows(len(samples)), np.int32)
        lengths[: len(samples)] = [s.expanded_length for s in samples]
        seq_len = self._prompt_bucket(int(lengths.max()))
        batch = self._assemble(samples, seq_len, len(lengths))
        return PreparedBatch(self._model_inputs(batch), lengths, len(samples), samples)

    # ---- compiled pieces ------------------------------------------------------------------
    def _empty_cache(self, rows: int, cache_len: int):
        t = self.cfg.text
        shape = (t.num_layers, rows, cache_len, t.num_kv_heads, t.head_dim)
        dtype = jnp.dtype(self.cfg.dtype)
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        spec = self._cache_spec(rows)
        if spec is not None:
            k, v = jax.lax.with_sharding_constraint(k, spec), jax.lax.with_sharding_constraint(v, spec)
        return k, v

    def _prefill_fn(self, state, inputs, lengths, *, cache_len: int, plain_causal: bool = False):
        with sharded_attention(self._attention):
            return self._prefill(state, inputs, lengths, cache_len, plain_causal)

    def _prefill(self, state, inputs, lengths, cache_len: int, plain_causal: bool):
        model = nnx.merge(self.graphdef, state)
        h, mtok = model.embed(inputs)
        seg = inputs["segment_ids"]
        rows, slots = seg.shape
        ctx = model.text.context(inputs["positions"], seg, kv_seg=seg, cache_index=jnp.int32(0),
                                 plain_causal=plain_causal)
        layers = tuple(self.cfg.injection_layers())
        inject = None
        if mtok is not None and layers:  # the Manager acts in the prefill pass only (SPEC §2.6)
            inject = lambda j, x: model.manager.inject(j, x, mtok, None)
        hidden, cache = model.text(h, ctx, injection_layers=layers, inject=inject,
                                   cache=self._empty_cache(rows, cache_len))
        last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
        # Right-padded prefill -> left-padded cache: slot s of row b takes slot s - (P - n_b).
        slot = jnp.arange(cache_len)[None, :]
        source = jnp.where(slot < slots, (slot - (slots - lengths)[:, None]) % slots, slot)  # [B, cache_len]
        index = source[None, :, :, None, None]
        cache = tuple(jnp.take_along_axis(c, index, axis=2) for c in cache)
        spec = self._cache_spec(rows)
        if spec is not None:
            cache = tuple(jax.lax.with_sharding_constraint(c, spec) for c in cache)
        return model.logits(last), cache

    def _step(self, model, layers, tokens, positions, slot, cache, kv_seg):
        h = model.text.embed(tokens[:, None])
        q_seg = jnp.ones((tokens.shape[0], 1), jnp.int32)
        ctx = model.text.context(positions[:, None], q_seg, kv_seg=kv_seg, q_slot=slot[None], cache_index=slot)
        with sharded_attention(self._attention):  # the fused decode kernels run per device on a mesh
            hidden, cache = model.text(h, ctx, cache=cache, layers=layers)
        return model.logits(hidden[:, 0]), cache

    def _decode_layers(self, model):
        """Unrolled decode: the decoder layers as separate modules, sliced out of the stacks once per
        call (outside the token loop), so no token step slices (on GPU: copies) a weight stack."""
        return None if self.decode_scan_layers else unstack_layers(model.text.layers)

    def _decode_step_fn(self, state, tokens, positions, slot, cache, kv_seg):
        model = nnx.merge(self.decode_graphdef, state)
        return self._step(model, self._decode_layers(model), tokens, positions, jnp.asarray(slot, jnp.int32),
                          cache, kv_seg)

    def _decode_loop_fn(self, state, first_logits, cache, kv_seg, next_pos, controls, key, *, greedy: bool,
                        new_slots: int):
        model = nnx.merge(self.decode_graphdef, state)
        layers = self._decode_layers(model)
        rows = first_logits.shape[0]
        prompt_slots = kv_seg.shape[1] - new_slots
        eos, pad = controls["eos"], controls["pad"]

        def pick(logits, seen, key):
            logits = limit_vocab(logits, controls["vocab_limit"])
            logits = apply_repetition_penalty(logits, seen, controls["repetition_penalty"])
            return select_tokens(logits, key, greedy=greedy, temperature=controls["temperature"],
                                 top_k=controls["top_k"], top_p=controls["top_p"])

        def is_eos(tok):
            return (tok[:, None] == eos[None, :]).any(-1)

        def mark(seen, tok):  # ids produced so far, for the repetition penalty
            return seen.at[jnp.arange(rows), tok].set(True)

        # Each row's own limit: max_new is the shortest prompt's (`_row_max_new`), a longer one has
        # less room below max_length.
        row_max = jnp.minimum(controls["max_new"], self.max_length - next_pos)

        def ended(tok, count):  # an end id, or the row's own answer limit
            return is_eos(tok) | (count >= row_max)

        key, sub = split_rows(row_keys(key, controls["stream"]))  # one random stream per prompt
        seen = jnp.zeros(first_logits.shape, bool)
        first = pick(first_logits, seen, sub)
        out = jnp.full((rows, new_slots), pad, jnp.int32).at[:, 0].set(first)
        count = jnp.ones((rows,), jnp.int32)
        # Rows that hold no prompt (a batch bucket's padding, decode_min_rows' fillers) start done:
        # the loop's end waits for the prompts' answers only.
        state0 = (jnp.int32(1), first, out, ended(first, count) | ~controls["live"], count, cache, key,
                  mark(seen, first))

        def room_for(steps):  # a token loop may run `steps` more steps (step i makes token i)
            def cond(carry):
                i, done = carry[0], carry[3]
                return (i + steps <= controls["max_new"]) & ~jnp.all(done)
            return cond

        def body(carry):
            i, tok, out, done, count, cache, key, seen = carry
            logits, cache = self._step(model, layers, tok, next_pos + i - 1, prompt_slots + i - 1, cache, kv_seg)
            key, sub = split_rows(key)
            new = jnp.where(done, pad, pick(logits, seen, sub))
            out = jax.lax.dynamic_update_slice(out, new[:, None], (jnp.int32(0), i))
            count = count + (~done).astype(jnp.int32)
            return i + 1, new, out, done | ended(new, count), count, cache, key, mark(seen, new)

        def run_of_steps(carry):
            # Unrolled, not a nested loop of known trip count: on an H100 the GPU runtime left the
            # device idle about 0.7 ms at the start of every inner loop (session-10 profile), as
            # much as the per-token host round trips that the runs save.
            for _ in range(self.decode_check_every):
                carry = body(carry)
            return carry

        carry = state0
        if self.decode_check_every > 1:  # runs of steps between the checks (no host round trip per token)
            carry = jax.lax.while_loop(room_for(self.decode_check_every), run_of_steps, carry)
        steps, _, out, done, count, cache, _, _ = jax.lax.while_loop(room_for(1), body, carry)
        # The cache is returned so that the donated input buffer is updated in place (aliased).
        return (*self._on_every_process(out, count, done, steps), cache)

    def _score_fn(self, state, inputs, pred_pos, targets, valid, vocab_limit, *, plain_causal: bool = False):
        model = nnx.merge(self.graphdef, state)
        with sharded_attention(self._attention):
            hidden = model.hidden_states(inputs, plain_causal=plain_causal)
        h = jnp.take_along_axis(hidden, pred_pos[..., None], axis=1)  # only the scored positions
        logits = limit_vocab(model.logits(h), vocab_limit)
        logp = jax.nn.log_softmax(logits, axis=-1)
        token_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.argmax(logits, axis=-1) == targets
        return self._on_every_process(jnp.sum(jnp.where(valid, token_lp, 0.0), axis=1), jnp.all(greedy | ~valid, axis=1))

    # ---- public API -----------------------------------------------------------------------
    def prefill(self, prepared: PreparedBatch, cache_len: int | None = None):
        """(logits after each prompt's last token [rows, V] fp32, left-padded KV cache (k, v)
        [L, rows, cache_len, KV, d]: row b's prompt in slots P - n_b .. P - 1)."""
        cache_len = cache_len or prepared.prompt_slots
        if cache_len < prepared.prompt_slots:
            raise ValueError(f"cache_len {cache_len} < prompt slots {prepared.prompt_slots}")
        rows = len(prepared.lengths)
        # Right-padded rows are exactly causal for their real tokens: flash kernels on GPU. On other
        # backends the explicit mask is kept (the XLA path needs it).
        plain = target_platform() == "gpu"
        arrays = self._put(dict(prepared.inputs, lengths=prepared.lengths), rows)
        lengths = arrays.pop("lengths")
        return self._prefill_jit(self.state, arrays, lengths, cache_len=cache_len, plain_causal=plain)

    def decode_step(self, tokens, positions, slot: int, cache, kv_seg):
        """One cached step: tokens [rows] at RoPE `positions` [rows] written to cache `slot`.

        kv_seg [rows, cache_len]: the segment id of every cache slot (0 = padding, 1 = this row's
        prompt and answer). Returns (logits [rows, V] fp32, the updated cache; the input is donated).
        """
        return self._step_jit(self.state, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                              slot, cache, jnp.asarray(kv_seg, jnp.int32))

    def kv_segments(self, prepared: PreparedBatch, new_slots: int) -> np.ndarray:
        """Segment ids of every slot of the (left-padded) cache: 0 before each prompt, then 1."""
        slots = prepared.prompt_slots
        first = slots - prepared.lengths[:, None]
        return (np.arange(slots + new_slots)[None, :] >= first).astype(np.int32)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams = SamplingParams(), *,
                 streams: Sequence[int] | None = None) -> list[Generation]:
        """Answers for `prompts` (one batch; rows and lengths bucketed).

        Sampling: prompt i of the batch draws from random stream `streams[i]` (default i) of
        `params.seed` (`sampling.row_keys`), whatever the batch. Give each prompt of a run its own
        stream (its index in the run, or one derived from what it is) and its draws do not depend
        on the batch size nor its place in the batch (its answer neither, as far as its logits do
        not), and repeated prompts get independent samples. Stream 0 is what a lone prompt has always used.
        """
        prepared = self.prepare(prompts)
        return self.generate_prepared(prepared, params, streams=streams)

    def generate_prepared(self, prepared: PreparedBatch, params: SamplingParams, *,
                          streams: Sequence[int] | None = None) -> list[Generation]:
        """Prefill, then the compiled decode loop, for a batch from `prepare`."""
        new_slots = self.new_slots(prepared, params)
        first_logits, cache = self.prefill(prepared, prepared.prompt_slots + new_slots)
        return self.decode(prepared, first_logits, cache, params, streams=streams)

    def new_slots(self, prepared: PreparedBatch, params: SamplingParams) -> int:
        """Cache slots reserved for the answers (the longest answer a prompt may have, bucketed)."""
        return length_bucket(int(self._row_max_new(prepared, params).max()), self.min_new_bucket)

    def _row_max_new(self, prepared: PreparedBatch, params: SamplingParams) -> np.ndarray:
        """Most tokens each prompt may get: max_new_tokens, cut to the room below max_length that
        its own length leaves (not the batch's longest: an answer must not depend on its batch)."""
        room = self.max_length - prepared.lengths[: prepared.num_prompts].astype(np.int64)
        if room.min() < 1:
            raise PromptTooLongError(f"a prompt fills {self._max_length_name} of {self.max_length} tokens; "
                                     "no room to generate")
        return np.minimum(params.max_new_tokens, room).astype(np.int32)

    def decode(self, prepared: PreparedBatch, first_logits, cache, params: SamplingParams, *,
               streams: Sequence[int] | None = None) -> list[Generation]:
        """The decode loop after `prefill(prepared, prompt_slots + new_slots(prepared, params))`
        (the cache is donated). `streams`: see `generate`."""
        rows, new_slots = len(prepared.lengths), cache[0].shape[2] - prepared.prompt_slots
        controls, kv_seg, next_pos = self._decode_controls(prepared, params, new_slots, streams=streams)
        if rows < self.decode_min_rows:
            first_logits, cache, kv_seg, next_pos = self._filler_rows(self.decode_min_rows - rows, prepared.prompt_slots,
                                                                      first_logits, cache, kv_seg, next_pos)
            kv_seg, next_pos = np.asarray(kv_seg), np.asarray(next_pos)  # host values, as `_put` takes them
            rows = self.decode_min_rows
        kv_seg = self._put({"kv_seg": kv_seg}, rows)["kv_seg"]
        next_pos = self._put({"next_pos": next_pos}, rows)["next_pos"]
        out, count, _, steps, cache = self._decode_jit(
            self.state, first_logits, cache, kv_seg, next_pos, controls, jax.random.key(params.seed),
            greedy=params.greedy, new_slots=new_slots,
        )
        del cache
        out, count = np.asarray(out), np.asarray(count)
        self.last_decode_steps = int(steps)
        # A row ended on an end id when its last token is one (else at its limit).
        eos = set(controls["eos"][controls["eos"] >= 0].tolist())
        return [
            Generation(out[r, : count[r]].tolist(), "eos" if out[r, count[r] - 1] in eos else "length",
                       int(prepared.lengths[r]))
            for r in range(prepared.num_prompts)
        ]

    @staticmethod
    def _filler_rows(fill: int, prompt_slots: int, first_logits, cache, kv_seg, next_pos):
        """The decode inputs with `fill` more rows repeating the last (decode_min_rows); their
        answers are dropped. Their keys are the answer slots only (the prompt's are segment 0, as a
        prompt of length 0): the decode-attention kernels skip the blocks before a row's segment,
        so the filler rows read none of the prompt's keys."""
        def repeat_last(a, axis=0):
            last = jax.lax.slice_in_dim(a, a.shape[axis] - 1, a.shape[axis], axis=axis)
            return jnp.concatenate([a, jnp.repeat(last, fill, axis)], axis)

        answers_only = (jnp.arange(kv_seg.shape[1]) >= prompt_slots).astype(kv_seg.dtype)
        kv_seg = jnp.concatenate([kv_seg, jnp.broadcast_to(answers_only, (fill, kv_seg.shape[1]))], 0)
        return repeat_last(first_logits), tuple(repeat_last(c, 1) for c in cache), kv_seg, repeat_last(next_pos)

    def _decode_controls(self, prepared: PreparedBatch, params: SamplingParams, new_slots: int, *,
                         streams: Sequence[int] | None = None):
        """The decode loop's host inputs: (controls, kv_seg [rows, slots], next_pos [rows]).

        controls["stream"] holds every decoded row's random stream (`generate`), the filler rows'
        (`decode_min_rows`: their answers are dropped) repeating the last."""
        prompts, rows = prepared.num_prompts, max(len(prepared.lengths), self.decode_min_rows)
        streams = np.arange(prompts) if streams is None else np.asarray(list(streams))
        if streams.shape != (prompts,) or not np.issubdtype(streams.dtype, np.integer):
            raise ValueError(f"streams must be {prompts} integers, one per prompt; got {streams.tolist()}")
        if prompts and (streams.min() < 0 or streams.max() > np.iinfo(np.int32).max):
            raise ValueError(f"streams must be in [0, 2**31); got {streams.tolist()}")
        # The rows after the prompts (the batch bucket's padding, decode_min_rows' fillers) repeat the last.
        streams = np.pad(streams.astype(np.int32), (0, rows - prompts), mode="edge")
        max_new = int(self._row_max_new(prepared, params).max())
        if new_slots < max_new:
            raise ValueError(f"the cache has {new_slots} answer slots, {max_new} are needed")
        eos_ids = self.eos_ids if params.eos_ids is None else [int(e) for e in params.eos_ids]
        if len(eos_ids) > MAX_EOS_IDS:
            raise InputError(f"at most {MAX_EOS_IDS} eos ids are supported, got {eos_ids}")
        eos = np.full(MAX_EOS_IDS, -1, np.int32)
        eos[: len(eos_ids)] = eos_ids
        controls = {
            "max_new": np.int32(max_new), "temperature": np.float32(params.temperature),
            "top_k": np.int32(params.top_k), "top_p": np.float32(params.top_p), "eos": eos,
            "repetition_penalty": np.float32(params.repetition_penalty),
            "pad": np.int32(self.pad_id),
            "vocab_limit": np.int32(self.vocab_limit if self.vocab_limit is not None else self.cfg.text.vocab_size),
            "stream": streams,
            # The rows that hold a prompt; the others (a bucket's padding, decode_min_rows' fillers) start done.
            "live": np.arange(len(streams)) < prepared.num_prompts,
        }
        return controls, self.kv_segments(prepared, new_slots), prepared.lengths

    # ---- ahead of time --------------------------------------------------------------------
    def compile_generate(self, prepared: PreparedBatch, params: SamplingParams = SamplingParams(), *,
                         compiler_options: Mapping[str, Any] | None = None):
        """Compiles, without running, the two programs `generate_prepared(prepared, params)` runs:
        {"prefill": Compiled, "decode": Compiled} (memory_analysis, cost_analysis, as_text). The
        engine may hold abstract params (an `nnx.eval_shape` model on compile-only devices).
        `compiler_options`: more XLA options, such as {"xla_dump_to": DIR} to read what XLA made of
        the programs (with the engine's own, e.g. `decode_command_buffers`)."""
        new_slots = self.new_slots(prepared, params)
        rows = len(prepared.lengths)
        inputs = self._abstract(dict(prepared.inputs, lengths=prepared.lengths), rows)
        lengths = inputs.pop("lengths")
        plain = target_platform() == "gpu"  # as `prefill`
        prefill = self._prefill_jit.lower(self.state, inputs, lengths, cache_len=prepared.prompt_slots + new_slots,
                                          plain_causal=plain).compile(compiler_options)
        first_logits, cache = jax.tree.map(lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype,
                                                                                       sharding=sharding),
                                           prefill.out_info, prefill.output_shardings)
        controls, kv_seg, next_pos = self._decode_controls(prepared, params, new_slots)
        if rows < self.decode_min_rows:  # as `decode`
            first_logits, cache, kv_seg, next_pos = jax.eval_shape(
                functools.partial(self._filler_rows, self.decode_min_rows - rows, prepared.prompt_slots), first_logits,
                cache, kv_seg, next_pos)
            rows = self.decode_min_rows
            first_logits = jax.ShapeDtypeStruct(first_logits.shape, first_logits.dtype, sharding=self._batch_spec(2, rows))
            cache = tuple(jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=self._cache_spec(rows)) for c in cache)
        host = self._abstract(dict(controls, kv_seg=kv_seg, next_pos=next_pos), rows)
        kv_seg, next_pos = host.pop("kv_seg"), host.pop("next_pos")
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self._replicated())
        decode = self._decode_jit.lower(self.state, first_logits, cache, kv_seg, next_pos, host, key,
                                        greedy=params.greedy, new_slots=new_slots).compile(compiler_options)
        return {"prefill": prefill, "decode": decode}

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Sum of log-probabilities of each request's target tokens (one full forward, no cache)."""
        args, kwargs, spans = self._score_call(requests, self._put)
        logprob, greedy = (np.asarray(x) for x in self._score_jit(*args, **kwargs))
        return [ScoreResult(float(logprob[r]), len(spans[r][1]), bool(greedy[r])) for r in range(len(requests))]

    def compile_score(self, requests: Sequence[ScoreRequest], *, compiler_options: Mapping[str, Any] | None = None):
        """Compiles, without running, the program `score(requests)` runs (a `Compiled`: its
        memory_analysis, cost_analysis, as_text). The engine may hold abstract params.
        `compiler_options`: as `compile_generate`'s."""
        args, kwargs, _ = self._score_call(requests, self._abstract)
        return self._score_jit.lower(*args, **kwargs).compile(compiler_options)

    def _score_call(self, requests: Sequence[ScoreRequest], place):
        """The score program's arguments, the host arrays placed by `place` (`_put`, or `_abstract`
        for a compile), its static keywords, and per row (prediction positions, target ids)."""
        inputs, extra, limit, spans = self._score_inputs(requests)
        rows = len(extra["valid"])
        inputs, extra = place(inputs, rows), place(extra, rows)
        args = (self.state, inputs, extra["pred_pos"], extra["targets"], extra["valid"], np.int32(limit))
        return args, {"plain_causal": target_platform() == "gpu"}, spans

    def _score_inputs(self, requests: Sequence[ScoreRequest]):
        """The host arrays of a score call: (model inputs, {pred_pos, targets, valid}, the vocab
        limit, per row (expanded prediction positions, target ids)). Rows bucketed like prefill."""
        if not requests:
            raise InputError("no score requests given")
        samples, spans = [], []
        limit = self.vocab_limit if self.vocab_limit is not None else self.cfg.text.vocab_size
        for i, req in enumerate(requests):
            ids = np.asarray(list(req.ids))
            if not 1 <= req.target_start < req.target_end <= len(ids):
                raise InputError(f"request {i}: target [{req.target_start}, {req.target_end}) must lie inside "
                                 f"the {len(ids)} ids and leave at least one token before it")
            scored = ids[req.target_start:req.target_end]
            if (scored == IMAGE_TOKEN_INDEX).any():
                raise InputError(f"request {i}: the scored tokens must not contain an image placeholder")
            if (scored >= limit).any() and (scored < self.cfg.text.vocab_size).all():
                raise InputError(f"request {i}: scored token id {int(scored[scored >= limit][0])} is excluded by the "
                                 f"vocab limit of {limit}: its log-probability would be -inf")
            sample = self.process(req.ids, req.images, str(i))
            # Expanded index of an unexpanded position: each earlier image adds (T - 1) slots.
            widths = np.ones(len(ids), np.int64)
            widths[ids == IMAGE_TOKEN_INDEX] = [p.num_tokens for p in sample.plans]
            expanded_start = np.cumsum(widths) - widths
            targets = ids[req.target_start:req.target_end]
            spans.append((expanded_start[req.target_start:req.target_end] - 1, targets))
            samples.append(sample)
        rows = self._rows(len(samples))
        seq_len = self._prompt_bucket(max(s.expanded_length for s in samples))
        batch = self._assemble(samples, seq_len, rows)
        width = length_bucket(max(len(t) for _, t in spans), 8)
        pred_pos = np.zeros((rows, width), np.int32)
        tgt = np.zeros((rows, width), np.int32)
        valid = np.zeros((rows, width), bool)
        for r, (pos, t) in enumerate(spans):
            pred_pos[r, : len(t)], tgt[r, : len(t)], valid[r, : len(t)] = pos, t, True
        # One right-padded sample per row: exactly causal, so flash attention on GPU (as in prefill);
        # rows past the requests are padding (`_rows`).
        return self._model_inputs(batch), {"pred_pos": pred_pos, "targets": tgt, "valid": valid}, limit, spans
