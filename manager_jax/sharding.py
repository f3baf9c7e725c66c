"""Device mesh and logical axis rules (DESIGN.md "Sharding").

The model files carry no sharding annotations. Instead, one table maps every parameter *path*
(``text.layers.attn.q.kernel``) to logical axis names per dimension, and one short rules table maps
logical names to mesh axes. Optimizer-state leaves (``...mu.text.layers.attn.q.kernel``) end with
their parameter's path, so the same table shards them too: FSDP for params, gradients and
optimizer state comes from sharding the ``embed`` dimension over ``fsdp``.

A dimension whose size is not a multiple of its mesh axes is left unsharded; a mesh axis is never
used twice in one spec. Head dimensions are the flattened width (heads x head_dim), so they split
even mid-head (0.5B's 2 KV heads of 64 on a tensor axis of 4: half a head per device); the results
are the same, at the cost of GSPMD resharding inside attention, which training and inference warn
about (`heads_split_mid_head`). An fsdp axis that splits none of a
large parameter's dimensions is refused instead (`check_fsdp_divides`), naming an fsdp x data split
that works.

Activations are left to GSPMD's propagation, with one exception: the Manager's multi-layer
features are split over "tensor" on their width (`models.attention.split_width_over_heads_axis`,
active inside the train step's and the engine's `sharded_attention`). Propagated from the
replicated residual stream they stay whole, 13 copies of the stream per image token.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes the batch is split over (pure data parallelism plus FSDP's data parallelism).
BATCH_AXES = ("data", "fsdp")


class ShardingError(ValueError):
    """A mesh or parameter that the sharding rules cannot handle."""


@dataclasses.dataclass
class MeshConfig:
    """Sizes of the mesh axes; one axis may be -1 (= all remaining devices).

    `num_devices` = -1 uses every device of every process; N uses the first N (a one-device run on
    a multi-device host, tests).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    num_devices: int = -1

    def shape(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 resolved; raises ShardingError when they do not multiply to num_devices."""
        sizes = {a: int(getattr(self, a)) for a in MESH_AXES}
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise ShardingError(f"at most one mesh axis may be -1, got {sizes}")
        if any(s == 0 or s < -1 for s in sizes.values()):
            raise ShardingError(f"mesh axis sizes must be >= 1 or -1, got {sizes}")
        known = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if num_devices % known:
                raise ShardingError(f"{num_devices} devices cannot fill mesh {sizes}: not a multiple of {known}")
            sizes[fill[0]] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ShardingError(
                f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available"
            )
        return sizes


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices of all processes),
    laid out by `device_grid`."""
    return Mesh(device_grid(config, list(jax.devices() if devices is None else devices)), MESH_AXES)


def device_grid(config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
    """`devices` (the first `config.num_devices`) as an array of the mesh's (data, fsdp, tensor) shape.

    Within one granule (a TPU slice; a GPU or CPU host) `mesh_utils.create_device_mesh` orders the
    devices, on TPU along the physical torus so that the innermost axis (tensor) gets the fastest
    links. Across granules (`device_granules`: TPU slices over DCN, hosts over the network) the
    slow links go to the outermost axes: the granules are split over `data` first, then over
    `fsdp` (`dcn_shape`), and every tensor group stays inside one granule (a shape that cannot is
    refused).
    """
    devices = list(devices)
    if config.num_devices != -1:
        if not 1 <= config.num_devices <= len(devices):
            raise ShardingError(f"mesh.num_devices={config.num_devices} but {len(devices)} devices exist")
        devices = devices[: config.num_devices]
    sizes = config.shape(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    kind, granules = device_granules(devices)
    if len(granules) == 1:
        return _granule_grid(shape, devices)
    per = {len(g) for g in granules}
    if len(per) != 1:
        raise ShardingError(
            f"the {len(devices)} devices lie unevenly on {len(granules)} {kind}s "
            f"({sorted(len(g) for g in granules)} devices each); mesh.num_devices must take whole {kind}s"
        )
    dcn = dcn_shape(sizes, len(granules), kind, per.pop())
    ici = tuple(s // d for s, d in zip(shape, dcn))
    # [granule, *ici] -> [*dcn, *ici] -> axis by axis (dcn outer, ici inner) -> the mesh.
    grids = np.stack([_granule_grid(ici, g) for g in granules]).reshape(dcn + ici)
    n = len(MESH_AXES)
    grid = grids.transpose([i for a in range(n) for i in (a, n + a)]).reshape(shape)
    logger.info("mesh %s over %d %ss: %s across them, %s within each", sizes, len(granules), kind,
                dict(zip(MESH_AXES, dcn)), dict(zip(MESH_AXES, ici)))
    if kind == "slice" and dcn[1] > 1:  # (GPU nodes: FSDP across nodes is the usual setup)
        # Every layer's weight gathers (and gradient reductions) then go over DCN, each step.
        logger.warning("mesh %s: fsdp spans %d TPU slices, so FSDP's weight gathers cross the data-center "
                       "network every layer; --set mesh.data=%d keeps fsdp inside a slice", sizes, dcn[1],
                       len(granules))
    return grid


def device_granules(devices: Sequence[Any]) -> tuple[str, list[list[Any]]]:
    """("slice" or "host", the devices of each, in order of their index): the groups whose devices
    share fast links. TPU devices of several slices carry `slice_index`; GPU devices of a
    multi-process job carry it per node (the processes of one host share it); otherwise a process is
    a host. Reads only `platform`, `slice_index` and `process_index` of the devices."""
    tpu = devices[0].platform == "tpu"
    kind = "slice" if tpu else "host"
    if tpu:
        key = lambda d: getattr(d, "slice_index", 0)
    elif all(hasattr(d, "slice_index") for d in devices):
        key = lambda d: d.slice_index
    else:
        key = lambda d: d.process_index
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    return kind, [groups[k] for k in sorted(groups)]


def dcn_shape(sizes: dict[str, int], granules: int, kind: str, per_granule: int) -> tuple[int, ...]:
    """How many of the `granules` each mesh axis spans: `data` as many as it can, `fsdp` the rest,
    `tensor` none (ShardingError, naming what would, where the shape needs it to cross)."""
    data = math.gcd(sizes["data"], granules)
    fsdp = math.gcd(sizes["fsdp"], granules // data)
    if data * fsdp == granules:
        return (data, fsdp, 1)
    if per_granule % sizes["tensor"]:
        fix = f"tensor must divide {per_granule}"
    else:
        fix = f"e.g. data={granules} (fsdp=-1 takes the rest)"
    raise ShardingError(
        f"mesh {sizes} would split tensor groups across {kind}s ({granules} {kind}s of {per_granule} devices, "
        f"whose data x fsdp = {sizes['data']} x {sizes['fsdp']} must take the {kind}s): {fix}"
    )


def _granule_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """Devices of one slice / host as an array of `shape`, in create_device_mesh's order."""
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception as err:  # noqa: BLE001 - any failure: listed order, said in the log
        # e.g. a part of a TPU slice (mesh.num_devices), which has no torus to follow.
        logger.warning("mesh %s over %d %s devices in their listed order, not along the physical links (%s: %s)",
                       shape, len(devices), devices[0].platform, type(err).__name__, str(err)[:300])
        return np.asarray(devices, dtype=object).reshape(shape)


# ---- parameter rules -------------------------------------------------------------------------
# (regex searched in the dotted path, logical axes of the dimensions). First match wins.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # Qwen2 decoder (stacked layers: leading "layers" axis).
    (r"text\.embed\.embedding$", ("vocab", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
    (r"text\.layers\.attn\.q\.kernel$", ("layers", "embed", "heads")),
    (r"text\.layers\.attn\.[kv]\.kernel$", ("layers", "embed", "kv_heads")),
    (r"text\.layers\.attn\.q\.bias$", ("layers", "heads")),
    (r"text\.layers\.attn\.[kv]\.bias$", ("layers", "kv_heads")),
    (r"text\.layers\.attn\.o\.kernel$", ("layers", "heads", "embed")),
    (r"text\.layers\.mlp\.(gate|up)\.kernel$", ("layers", "embed", "mlp")),
    (r"text\.layers\.mlp\.down\.kernel$", ("layers", "mlp", "embed")),
    (r"text\.layers\.\w+norm\.scale$", ("layers", "norm")),
    (r"text\.norm\.scale$", ("norm",)),
    # SigLIP tower.
    (r"vision\.patch_embed\.kernel$", (None, None, None, "vision_embed")),
    (r"vision\.pos_embed$", (None, "vision_embed")),
    (r"vision\.layers\.attn\.[qkv]\.kernel$", ("layers", "vision_embed", "vision_heads")),
    (r"vision\.layers\.attn\.[qkv]\.bias$", ("layers", "vision_heads")),
    (r"vision\.layers\.attn\.o\.kernel$", ("layers", "vision_heads", "vision_embed")),
    (r"vision\.layers\.mlp\.fc1\.kernel$", ("layers", "vision_embed", "vision_mlp")),
    (r"vision\.layers\.mlp\.fc1\.bias$", ("layers", "vision_mlp")),
    (r"vision\.layers\.mlp\.fc2\.kernel$", ("layers", "vision_mlp", "vision_embed")),
    (r"vision\.layers\.[\w.]+$", ("layers", "norm")),  # layer norms, o / fc2 biases
    (r"vision\.[\w.]+$", ("norm",)),  # patch bias, post_ln
    # Projector, newline, Manager.
    (r"projector\.linear1\.kernel$", ("vision_embed", "mlp")),
    (r"projector\.linear1\.bias$", ("mlp",)),
    (r"projector\.linear2\.kernel$", ("mlp", "embed")),
    (r"projector\.linear2\.bias$", ("norm",)),
    (r"image_newline$", ("norm",)),
    (r"manager\.layer_embedding$", (None, "embed")),
    (r"manager\.blocks\.\d+\.(layer_scores|zero_gate)$", (None, "embed")),
    (r"manager\.blocks\.\d+\.controller\.kernel$", ("embed", None)),
    (r"manager\.blocks\.\d+\.fusion_[qk]\.kernel$", ("embed", "mlp")),
    (r"manager\.blocks\.\d+\.fusion_[qk]\.bias$", ("mlp",)),
)

# Logical axis -> mesh axes. None = replicated.
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vision_embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "layers": None,
    "norm": None,
}


def path_str(path: Sequence[Any]) -> str:
    """Dotted name of a jax key path: (DictKey('text'), DictKey('embed'), ...) -> 'text.embed'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def logical_axes(path: str, shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (or optimizer-state leaf) from its dotted path.

    Scalars and leaves no rule knows (step counters, ...) are replicated.
    """
    if len(shape) == 0:
        return ()
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path):
            if len(axes) != len(shape):
                raise ShardingError(
                    f"sharding rule {pattern!r} gives {len(axes)} axes {axes} for {path!r} of shape {tuple(shape)}"
                )
            return axes
    return (None,) * len(shape)


def spec_for(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict | None = None
) -> P:
    """PartitionSpec for one array: logical names -> mesh axes, dropping non-dividing or reused axes."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % n:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


# Params as the forward / backward pass uses them: gathered over the FSDP axis (each device computes
# its own batch shard with whole weights), still split over "tensor".
COMPUTE_RULES: dict[str, tuple[str, ...] | str | None] = {
    k: (None if v == "fsdp" else v) for k, v in LOGICAL_RULES.items()
}


def _leaf_path(path: Sequence[Any]) -> str:
    # Variables inside an nnx State flatten with a trailing ".value"; the rules name the param.
    name = path_str(path)
    return name[: -len(".value")] if name.endswith(".value") else name


def compute_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings of the params as a micro-step hands them to the model.

    Params outside the layer stacks (embeddings, projector, Manager, norms) are gathered over the
    FSDP axis once per micro-step. Stacked layer params (leading ``layers`` axis) keep their FSDP
    split: :func:`layer_compute_sharding` gathers them one layer at a time inside the layer scan,
    so a whole stack of gathered weights is never alive at once.
    """

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        logical = logical_axes(_leaf_path(path), shape)
        rules = LOGICAL_RULES if logical[:1] == ("layers",) else COMPUTE_RULES
        return NamedSharding(mesh, spec_for(logical, shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def layer_compute_sharding(stack_path: str, path: Sequence[Any], layer_shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Gathered sharding of one layer's slice of a stacked param (``stack_path`` e.g. "text.layers")."""
    full = f"{stack_path}.{_leaf_path(path)}"
    logical = logical_axes(full, (1, *layer_shape))[1:]
    return NamedSharding(mesh, spec_for(logical, layer_shape, mesh, COMPUTE_RULES))


def tree_shardings(tree: Any, mesh: Mesh, rules: dict | None = None) -> Any:
    """NamedShardings for every leaf of a params / optimizer-state tree (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, spec_for(logical_axes(_leaf_path(path), shape), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, shard_dim: int = 1) -> NamedSharding:
    """Sharding of a batch array whose dimension `shard_dim` indexes data shards."""
    spec = [None] * ndim
    spec[shard_dim] = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None
    return NamedSharding(mesh, P(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of devices the batch is split over (data x fsdp)."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def local_shard_indices(mesh: Mesh, num_shards: int, process_index: int | None = None) -> list[int]:
    """The data shards (rows of the shard dimension) that this process's devices hold, in order
    (another process's with `process_index`, e.g. of compile-only devices).

    Each process feeds exactly these shards; together the processes cover 0..num_shards-1 once.
    """
    if num_shards % data_parallel_size(mesh):
        raise ShardingError(
            f"batch_shards={num_shards} must be a multiple of the data-parallel size "
            f"data*fsdp={data_parallel_size(mesh)}"
        )
    process = jax.process_index() if process_index is None else process_index
    sharding = batch_sharding(mesh, 2, shard_dim=0)
    rows: set[int] = set()
    for device, index in sharding.devices_indices_map((num_shards, 1)).items():
        if device.process_index == process:
            rows.update(range(*index[0].indices(num_shards)))
    return sorted(rows)


def replicated_leaves(tree: Any) -> list[tuple[int, str, tuple[int, ...]]]:
    """(bytes, path, shape) of the leaves whose sharding keeps them whole on every device, largest
    first. `tree`: arrays or ShapeDtypeStructs with shardings (e.g. `TrainSetup.abstract_state`)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(leaf.shape)
        if shape and leaf.sharding.shard_shape(shape) == shape:
            out.append((math.prod(shape) * np.dtype(leaf.dtype).itemsize, path_str(path), shape))
    return sorted(out, reverse=True)


# A parameter this large that the fsdp axis cannot split is a memory problem, not a detail: it and
# its gradient and Adam moments are then whole on every device (0.5B at fsdp=256: 10 GiB per device
# instead of 40 MiB). Smaller leaves (norms, biases, the Manager's scores) may stay whole.
FSDP_MIN_BYTES = 1 << 20


def heads_split_mid_head(model_config: Any, mesh: Any) -> str | None:
    """A warning when the mesh axes of the head dimensions split attention heads mid-head (a head
    count they do not divide, its flattened width they do), or None. The results are the same
    (module doc); each layer's attention then regathers whole heads, which a tensor size dividing
    every head count avoids."""
    axes = {a for name in ("heads", "kv_heads", "vision_heads")
            for a in ((LOGICAL_RULES[name],) if isinstance(LOGICAL_RULES[name], str) else LOGICAL_RULES[name] or ())}
    n = math.prod(mesh.shape.get(a, 1) for a in axes)
    if n == 1:
        return None
    text, vision = model_config.text, model_config.vision
    counts = {"text query": (text.num_heads, text.head_dim), "text key/value": (text.num_kv_heads, text.head_dim),
              "vision": (vision.num_heads, vision.head_dim)}
    split = [f"{count} {name} heads ({count / n:g} per device)"
             for name, (count, head_dim) in counts.items() if count % n and count * head_dim % n == 0]
    if not split:
        return None
    whole = math.gcd(*(count for count, _ in counts.values()))
    fits = [d for d in range(1, n) if whole % d == 0 and n % d == 0]
    return (f"mesh {'x'.join(sorted(axes))}={n} splits attention heads mid-head: {', '.join(split)}; the results are "
            f"the same, but every layer's attention regathers whole heads (slower). "
            f"{'x'.join(sorted(axes))}={' or '.join(map(str, fits))} keeps whole heads on each device")


def check_fsdp_divides(tree: Any, mesh: Any, min_bytes: int = FSDP_MIN_BYTES, *,
                       remedy: str = "use fsdp={fsdp} and data={data}", training: bool = True) -> None:
    """Raises ShardingError when the mesh's fsdp axis splits none of the dimensions meant for it
    (``embed`` / ``vision_embed``) of a parameter of `min_bytes` or more, naming a mesh that does.

    `tree`: params (arrays or ShapeDtypeStructs); optimizer state has their specs, so it is covered.
    `remedy`: how the caller's user sets that mesh (their flags), formatted with `fsdp` and `data`.
    `training`: whether gradients and optimizer state come with the params (the message says so).
    """
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp == 1:
        return
    meant = [k for k, v in LOGICAL_RULES.items() if v == "fsdp" or (isinstance(v, tuple) and "fsdp" in v)]
    unsplit, dims = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(getattr(leaf, "shape", ()))
        nbytes = math.prod(shape) * np.dtype(leaf.dtype).itemsize if shape else 0
        if nbytes < min_bytes:
            continue
        name = _leaf_path(path)
        logical = logical_axes(name, shape)
        sizes = [size for axis, size in zip(logical, shape) if axis in meant]
        if not sizes:
            continue
        dims += sizes
        spec = spec_for(logical, shape, mesh)
        if "fsdp" not in {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}:
            unsplit.append((nbytes, name, shape))
    if not unsplit:
        return
    unsplit.sort(reverse=True)
    fit = max(f for f in range(1, fsdp + 1) if fsdp % f == 0 and all(d % f == 0 for d in dims))
    data = mesh.shape.get("data", 1) * fsdp // fit
    names = ", ".join(f"{n} {s}" for _, n, s in unsplit[:3]) + (f" and {len(unsplit) - 3} more" if len(unsplit) > 3 else "")
    raise ShardingError(
        f"mesh fsdp={fsdp} divides no dimension of {names} ({sum(b for b, _, _ in unsplit) / 2**30:.2f} GiB), "
        f"which would then be whole on every device{' with its gradient and optimizer state' if training else ''}; "
        f"{remedy.format(fsdp=fit, data=data)} (fsdp must divide {sorted(set(dims))})"
    )
