"""PyTorch ground truth for LLaVA-OV-Manager, written from SPEC.md §2 and §3.

It reuses the submodules of an HF transformers `LlavaOnevisionForConditionalGeneration` (SigLIP
tower, projector, embedding, Qwen2 decoder layers, rotary embedding, norm, lm_head) and
re-implements, in its own code, everything the original repository does differently: the
multi-layer vision features, the per-image assembly of main and Manager features, the
bookkeeping of `prepare_inputs_labels_for_multimodal` and the injection loop of the patched
`Qwen2Model.forward`, including the original quirks (SPEC §2.4-§2.7, §3.6-§3.9).

Inputs follow the HF layout: `input_ids` already hold `T_i` copies of the image token id for
image i (use `TorchManagerReference.image_token_counts` to get `T_i`), `pixel_values` is
[n_images, max_crops, 3, 384, 384] and `image_sizes` is [n_images, 2] as (H, W).

Conventions (`ManagerSettings.convention`):
- "original": the Manager repository. `int()` unpad, no newline on single-crop images, the max_N
  downsample only when `image_aspect_ratio` contains "anyres_max", pinpoints read as (w, h) from
  the settings, multi-image starts by the formula idx_k - k + 729 k.
- "hf": transformers 5.24 `LlavaOnevision`. `round(x, 7)` unpad, a newline after the main features
  of single-crop images (the Manager features stay 729), the max_N rule of the HF config's
  `vision_aspect_ratio` always applies, pinpoints read as (h, w) from the HF config. On the
  multi-image Manager path (which HF lacks) the real image starts and lengths replace the
  original's 729-per-image arithmetic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as nnf
from torch import nn

MANAGER_TYPES = (
    "static_zerouni",
    "adaptive_zerouni",
    "adaptive_last_zerouni",
    "adaptive_average_zerouni",
    "adaptive_cross_zerouni",
)
GRID_TYPES = ("main", "all", "grid")
CONVENTIONS = ("original", "hf")
MERGE_TYPES = ("flat", "spatial_unpad")
IGNORE_INDEX = -100
DEFAULT_IM_START_ID = 151644  # <|im_start|>, hard-coded in the original (llava/constants.py)

# SPEC §3.3: "(1x1),...,(6x6)" expands to [(i*384, j*384) for i in 1..6 for j in 1..6], read as (w, h).
DEFAULT_PINPOINTS_WH = [(i * 384, j * 384) for i in range(1, 7) for j in range(1, 7)]

JitterValue = torch.Tensor | Callable[[tuple[int, ...], int], torch.Tensor]


def expand_pinpoints(pinpoints: str | Sequence[Sequence[int]], tile: int = 384) -> list[tuple[int, int]]:
    """Pinpoints as a list of pairs; the string form "(AxB),...,(CxD)" expands like the original."""
    if isinstance(pinpoints, str):
        matches = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if len(matches) < 1:
            raise ValueError(f"cannot parse pinpoints string {pinpoints!r}")
        (a0, b0), (a1, b1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
        return [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    out = []
    for pair in pinpoints:
        if len(pair) != 2:
            raise ValueError(f"pinpoint {pair!r} is not a pair")
        out.append((int(pair[0]), int(pair[1])))
    return out


@dataclass
class ManagerSettings:
    """What the original config.json says about the Manager and the image handling.

    `im_start_id` is the `<|im_start|>` id used to find the adaptive managers' extra query
    (151644 in Qwen2; tests with a tiny vocabulary set a small id). `model_max_length` is
    `tokenizer_model_max_length`: the expanded sequence is cut to it after the bookkeeping,
    as in the original (None = no cut).
    """

    manager_type: str = "static_zerouni"
    grid_type: str = "all"
    select_layers: list[int] = field(default_factory=lambda: list(range(13, 26)))
    injection_layers: list[int] = field(default_factory=lambda: [0, 4, 8, 12, 16, 20])
    convention: str = "original"
    image_aspect_ratio: str = "anyres_max_9"
    merge_type: str = "spatial_unpad"
    image_grid_pinpoints: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_PINPOINTS_WH))
    im_start_id: int = DEFAULT_IM_START_ID
    model_max_length: int | None = None

    def __post_init__(self) -> None:
        if self.manager_type not in MANAGER_TYPES:
            raise ValueError(f"manager_type {self.manager_type!r} is not one of {MANAGER_TYPES}")
        if self.grid_type not in GRID_TYPES:
            raise ValueError(f"grid_type {self.grid_type!r} is not one of {GRID_TYPES}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention {self.convention!r} is not one of {CONVENTIONS}")
        if self.merge_type not in MERGE_TYPES:
            raise ValueError(f"merge_type {self.merge_type!r} is not one of {MERGE_TYPES}")
        ar = self.image_aspect_ratio
        if not (ar in ("square", "pad", "anyres") or re.fullmatch(r"anyres_max_\d+", ar)):
            raise ValueError(f"image_aspect_ratio {ar!r} must be square, pad, anyres or anyres_max_N")
        if self.convention == "hf" and self.merge_type != "spatial_unpad":
            raise ValueError("convention 'hf' models transformers' LlavaOnevision, which only has spatial_unpad")
        self.select_layers = [int(x) for x in self.select_layers]
        self.injection_layers = [int(x) for x in self.injection_layers]
        if not self.select_layers:
            raise ValueError("select_layers must not be empty")
        if not self.injection_layers:
            raise ValueError("injection_layers must not be empty")
        if sorted(set(self.injection_layers)) != self.injection_layers:
            raise ValueError(f"injection_layers must be strictly increasing, got {self.injection_layers}")
        if min(self.injection_layers) < 0 or min(self.select_layers) < 0:
            raise ValueError("select_layers and injection_layers must be non-negative")
        if 0 in self.injection_layers and len(self.select_layers) < 2:
            raise ValueError("the layer-0 manager drops the last selected layer: select at least 2 layers")
        self.image_grid_pinpoints = expand_pinpoints(self.image_grid_pinpoints)
        if self.model_max_length is not None and self.model_max_length < 1:
            raise ValueError(f"model_max_length must be positive, got {self.model_max_length}")

    @property
    def adaptive(self) -> bool:
        return "adaptive" in self.manager_type

    @property
    def query_type(self) -> str:
        """"none" for static and plain adaptive; "last" / "average" / "cross" otherwise (SPEC §2.7)."""
        name = self.manager_type.replace("_zerouni", "")
        return name.split("adaptive_")[-1] if "adaptive_" in name else "none"

    @property
    def num_select(self) -> int:
        return len(self.select_layers)

    def is_static_block(self, j: int) -> bool:
        """Manager j is a StaticManagerZeroInit (all of them for static; layer 0 for adaptive)."""
        return not self.adaptive or self.injection_layers[j] == 0

    def num_scores(self, j: int) -> int:
        """N_j: the layer-0 manager drops the last selected layer."""
        return self.num_select - 1 if self.injection_layers[j] == 0 else self.num_select


def manager_param_shapes(settings: ManagerSettings, hidden: int) -> dict[str, tuple[int, ...]]:
    """Original checkpoint key -> shape of every Manager tensor (SPEC §2.2, §6.1)."""
    n = settings.num_select
    shapes: dict[str, tuple[int, ...]] = {"model.manager_layer_embedding": (n, hidden)}
    for j in range(len(settings.injection_layers)):
        prefix = f"model.manager.{j}"
        if settings.is_static_block(j):
            shapes[f"{prefix}.layer_scores"] = (1, settings.num_scores(j), 1, hidden)
            continue
        width = hidden if settings.query_type == "none" else 2 * hidden
        shapes[f"{prefix}.linear_controller.weight"] = (n, width)
        shapes[f"{prefix}.zero_gate"] = (1, n, 1, hidden)
        if settings.query_type == "cross":
            for proj in ("q_proj", "k_proj"):
                shapes[f"{prefix}.fusion_attention.{proj}.weight"] = (hidden, hidden)
                shapes[f"{prefix}.fusion_attention.{proj}.bias"] = (hidden,)
    return shapes


def init_manager_params(
    settings: ManagerSettings, hidden: int, seed: int = 0, nonzero: bool = True
) -> dict[str, torch.Tensor]:
    """Manager tensors under their original checkpoint names, fp32.

    nonzero=False reproduces the original init: zero `layer_scores` / `zero_gate` (the manager is a
    no-op), `manager_layer_embedding` ~ randn / sqrt(D), controller ~ N(0, 0.02), fusion Linear ~
    U(+-1/sqrt(D)). nonzero=True draws every tensor at random and non-zero (zero init hides bugs).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    params = {}
    for key, shape in manager_param_shapes(settings, hidden).items():
        if key.endswith("manager_layer_embedding"):
            value = randn(shape, 1.0 / math.sqrt(hidden))
        elif key.endswith("layer_scores") or key.endswith("zero_gate"):
            value = randn(shape, 0.5) if nonzero else torch.zeros(shape)
        elif key.endswith("linear_controller.weight"):
            value = randn(shape, 0.2 if nonzero else 0.02)
        else:  # fusion_attention q/k weight and bias
            bound = 1.0 / math.sqrt(hidden)
            value = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        params[key] = value.float()
    return params


@dataclass
class ImageGeometry:
    """How one image turns into tokens (SPEC §3.6-§3.9, §2.4).

    n_crops: crops fed to the tower (1 + nh*nw for a grid). grid_hw: (nh, nw) tiles or None.
    unpadded_hw / resized_hw: grid feature map after unpad / after the max_N bilinear resize
    (resized_hw is None when no resize happens). num_tokens: T, main features inserted into the
    sequence. manager_len: L, length of the Manager features.
    """

    n_crops: int
    grid_hw: tuple[int, int] | None
    unpadded_hw: tuple[int, int] | None
    resized_hw: tuple[int, int] | None
    num_tokens: int
    manager_len: int


@dataclass
class _Sample:
    """Bookkeeping of one batch row, in the original's terms (SPEC §2.5)."""

    images: list[int]  # global image indices, in order
    starts: list[int]  # image_index_list: where each image's manager update begins
    lengths: list[int]  # image_length_list: L of each image
    query: tuple[int, int, int] | None  # query_index_list entry (same for every image)
    true_starts: list[int]  # real start of each image's tokens in the expanded sequence
    true_ends: list[int]  # real end (exclusive) of each image's tokens
    third_im_start: int = -1  # expanded position of the 3rd <|im_start|> (or the length); -1 plain


def _best_resolution(width: int, height: int, candidates_wh: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """select_best_resolution (original mm_utils.py and HF agree; strict comparisons, first wins)."""
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in candidates_wh:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    if best is None:
        raise ValueError(f"no pinpoint fits image {width}x{height}")
    return best


def _unpad_bounds(rows: int, cols: int, height: int, width: int, convention: str) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) kept by unpad_image; "original" truncates, "hf" rounds."""

    def to_int(x: float) -> int:
        return int(x) if convention == "original" else int(round(x, 7))

    if width / height > cols / rows:
        new_h = to_int(height * (cols / width))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = to_int(width * (rows / height))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


class TorchManagerReference(nn.Module):
    """HF LlavaOnevision modules + Manager params + settings -> logits of the original model."""

    def __init__(self, hf_model: nn.Module, manager_params: Mapping[str, torch.Tensor], settings: ManagerSettings):
        super().__init__()
        self.hf = hf_model
        self.settings = settings
        cfg = hf_model.config
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        if vcfg.image_size // vcfg.patch_size != 27:
            raise ValueError(f"the algorithm needs 27x27 = 729 tokens per crop, got image_size "
                             f"{vcfg.image_size} / patch {vcfg.patch_size}")
        self.side = 27
        self.num_patches = 729
        self.tile = vcfg.image_size
        self.hidden = tcfg.hidden_size
        n_vision_states = vcfg.num_hidden_layers + 1
        bad = [x for x in settings.select_layers if x >= n_vision_states]
        if bad:
            raise ValueError(f"select_layers {bad} out of range: the tower has {n_vision_states} hidden states")
        bad = [x for x in settings.injection_layers if x >= tcfg.num_hidden_layers]
        if bad:
            raise ValueError(f"injection_layers {bad} out of range: the LLM has {tcfg.num_hidden_layers} layers")
        expected = manager_param_shapes(settings, self.hidden)
        missing = sorted(set(expected) - set(manager_params))
        unexpected = sorted(set(manager_params) - set(expected))
        if missing or unexpected:
            raise ValueError(f"manager params do not match the settings: missing {missing}, unexpected {unexpected}")
        for key, shape in expected.items():
            if tuple(manager_params[key].shape) != shape:
                raise ValueError(f"{key}: expected shape {shape}, got {tuple(manager_params[key].shape)}")
        dtype = hf_model.dtype
        # Plain tensors (not registered): pass tensors with requires_grad=True to get their grads.
        self.manager_params = {k: v.to(dtype) if v.dtype != dtype else v for k, v in manager_params.items()}
        self.image_token_id = int(cfg.image_token_id)
        if settings.convention == "hf":
            # HF pinpoints are (h, w); store as (w, h) in HF's order.
            self.pinpoints_wh = [(int(p[1]), int(p[0])) for p in cfg.image_grid_pinpoints]
            self.max_patches = int(cfg.vision_aspect_ratio.strip("anyres_max_"))
        else:
            self.pinpoints_wh = list(settings.image_grid_pinpoints)
            match = re.match(r"anyres_max_(\d+)", settings.image_aspect_ratio)
            self.max_patches = int(match.group(1)) if match else None

    # ------------------------------------------------------------------ geometry
    def image_geometry(self, image_size_hw: Sequence[int], single_crop: bool = False) -> ImageGeometry:
        """Token geometry of one image of size (H, W); single_crop forces one crop (multi-image samples)."""
        s, side, n = self.settings, self.side, self.num_patches
        height, width = int(image_size_hw[0]), int(image_size_hw[1])
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got (H, W) = ({height}, {width})")
        use_grid = s.image_aspect_ratio.startswith("anyres") and not single_crop
        grid_hw = None
        n_crops = 1
        if use_grid:
            w_best, h_best = _best_resolution(width, height, self.pinpoints_wh)
            grid_hw = (h_best // self.tile, w_best // self.tile)
            n_crops = 1 + grid_hw[0] * grid_hw[1]
        if s.merge_type == "flat":
            return ImageGeometry(n_crops, grid_hw, None, None, n_crops * n, n_crops * n)
        if n_crops == 1:
            newline = 1 if s.convention == "hf" else 0
            return ImageGeometry(1, None, None, None, n + newline, n)
        nh, nw = grid_hw
        r0, r1, c0, c1 = _unpad_bounds(side * nh, side * nw, height, width, s.convention)
        h, w = r1 - r0, c1 - c0
        resized = None
        if self.max_patches is not None:
            times = math.sqrt(h * w / (self.max_patches * side**2))
            if times > 1.1:
                resized = (int(h // times), int(w // times))
        fh, fw = resized if resized is not None else (h, w)
        grid_tokens = fh * (fw + 1)
        manager_len = {"main": n, "all": n + grid_tokens, "grid": grid_tokens}[s.grid_type]
        return ImageGeometry(n_crops, grid_hw, (h, w), resized, n + grid_tokens, manager_len)

    def _geometries(self, image_sizes: torch.Tensor | Sequence, batch_num_images: Sequence[int] | None,
                    ) -> list[ImageGeometry]:
        sizes = [tuple(int(v) for v in row) for row in (image_sizes.tolist() if torch.is_tensor(image_sizes)
                                                        else image_sizes)]
        single = [False] * len(sizes)
        if batch_num_images is not None:
            counts = [int(c) for c in batch_num_images]
            if sum(counts) != len(sizes):
                raise ValueError(f"batch_num_images {counts} sums to {sum(counts)}, but {len(sizes)} images were given")
            single = [c > 1 for c in counts for _ in range(c)]
        return [self.image_geometry(sz, sg) for sz, sg in zip(sizes, single)]

    def image_token_counts(self, image_sizes: torch.Tensor | Sequence,
                           batch_num_images: Sequence[int] | None = None) -> list[int]:
        """T_i for each image: how many image tokens the caller must put in input_ids."""
        return [g.num_tokens for g in self._geometries(image_sizes, batch_num_images)]

    # ------------------------------------------------------------------ features
    def _encode(self, pixel_values: torch.Tensor, geoms: list[ImageGeometry]):
        """Vision tower once over all crops; main and multi-layer features per image (SPEC §2.3)."""
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [n_images, max_crops, 3, H, W], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != len(geoms):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} images, image_sizes {len(geoms)}")
        for i, g in enumerate(geoms):
            if pixel_values.shape[1] < g.n_crops:
                raise ValueError(f"image {i} needs {g.n_crops} crops, pixel_values holds {pixel_values.shape[1]}")
        model = self.hf.model
        crops = torch.cat([pixel_values[i, : g.n_crops] for i, g in enumerate(geoms)], dim=0)
        crops = crops.to(self.hf.dtype)
        out = model.vision_tower(crops, output_hidden_states=True, return_dict=True)
        states = out.hidden_states
        main = model.multi_modal_projector(states[-1])  # [C, 729, D]; no post-LN
        multi = torch.stack(states, dim=0)[self.settings.select_layers].transpose(0, 1)  # [C, N, 729, Dv]
        multi = model.multi_modal_projector(multi)
        embedding = self.manager_params["model.manager_layer_embedding"]
        multi = multi + embedding[None, :, None, :]
        split = [g.n_crops for g in geoms]
        return list(torch.split(main, split)), list(torch.split(multi, split))

    def _assemble(self, main: torch.Tensor, multi: torch.Tensor, geom: ImageGeometry, size_hw: Sequence[int]):
        """Main [T, D] and Manager [N, L, D] features of one image (SPEC §2.4, §3.6, §3.7, §3.9)."""
        s, side = self.settings, self.side
        newline = self.hf.model.image_newline
        if s.merge_type == "flat":
            return main.flatten(0, 1), multi.transpose(0, 1).flatten(1, 2)
        if geom.n_crops == 1:
            main_out = main[0]
            if s.convention == "hf":
                main_out = torch.cat((main_out, newline[None].to(main_out.dtype)), dim=0)
            return main_out, multi[0]
        nh, nw = geom.grid_hw
        height, width = int(size_hw[0]), int(size_hw[1])
        r0, r1, c0, c1 = _unpad_bounds(side * nh, side * nw, height, width, s.convention)
        dim = main.shape[-1]
        # [P, 729, D] -> [nh, nw, 27, 27, D] -> [D, 27 nh, 27 nw] (rows = tile row, patch row)
        grid = main[1:].view(nh, nw, side, side, dim).permute(4, 0, 2, 1, 3).reshape(dim, nh * side, nw * side)
        grid = grid[:, r0:r1, c0:c1]
        if geom.resized_hw is not None:
            grid = nnf.interpolate(grid[None], list(geom.resized_hw), mode="bilinear")[0]
        grid = torch.cat((grid, newline[:, None, None].to(grid.dtype).expand(dim, grid.shape[1], 1)), dim=-1)
        main_out = torch.cat((main[0], grid.flatten(1, 2).transpose(0, 1)), dim=0)
        if s.grid_type == "main":
            return main_out, multi[0]
        n = multi.shape[1]
        mgrid = multi[1:].transpose(0, 1).reshape(n, nh, nw, side, side, dim)
        mgrid = mgrid.permute(0, 5, 1, 3, 2, 4).reshape(n, dim, nh * side, nw * side)
        mgrid = mgrid[:, :, r0:r1, c0:c1]
        if geom.resized_hw is not None:
            mgrid = nnf.interpolate(mgrid, list(geom.resized_hw), mode="bilinear")
        # The newline column gets no layer embedding.
        nl = newline[None, :, None, None].to(mgrid.dtype).expand(n, dim, mgrid.shape[2], 1)
        mgrid = torch.cat((mgrid, nl), dim=-1).flatten(2, 3).transpose(1, 2)  # [N, L_grid, D]
        if s.grid_type == "all":
            mgrid = torch.cat((multi[0], mgrid), dim=1)
        return main_out, mgrid

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | Sequence,
                       batch_num_images: Sequence[int] | None = None,
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: main features [T_i, D] and Manager features [N, L_i, D]."""
        geoms = self._geometries(image_sizes, batch_num_images)
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else list(image_sizes)
        mains, multis = self._encode(pixel_values, geoms)
        pairs = [self._assemble(m, mm, g, sz) for m, mm, g, sz in zip(mains, multis, geoms, sizes)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    # ------------------------------------------------------------------ bookkeeping
    def _bookkeeping(self, input_ids: torch.Tensor, lengths: list[int], geoms: list[ImageGeometry],
                     batch_num_images: Sequence[int] | None) -> list[_Sample]:
        """Assign images to rows, check the image-token runs, build SPEC §2.5's index lists."""
        s = self.settings
        batch = input_ids.shape[0]
        positions = [torch.nonzero(input_ids[b, : lengths[b]] == self.image_token_id).flatten().tolist()
                     for b in range(batch)]
        for b in range(batch):
            if bool((input_ids[b, lengths[b]:] == self.image_token_id).any()):
                raise ValueError(f"row {b}: image tokens inside the padding")
        if batch_num_images is not None:
            counts = [int(c) for c in batch_num_images]
            if len(counts) != batch:
                raise ValueError(f"batch_num_images has {len(counts)} entries for a batch of {batch}")
        elif s.image_aspect_ratio.startswith("anyres"):
            # Multi-image rows change the crop count (pad is forced), so they must be declared.
            counts = [1 if positions[b] else 0 for b in range(batch)]
        else:
            counts, nxt = [], 0
            for b in range(batch):
                left, c = len(positions[b]), 0
                while left > 0 and nxt < len(geoms):
                    left -= geoms[nxt].num_tokens
                    nxt, c = nxt + 1, c + 1
                counts.append(c)
        if sum(counts) != len(geoms):
            raise ValueError(f"rows take {sum(counts)} images ({counts}) but {len(geoms)} were given; "
                             "pass batch_num_images")
        samples, nxt = [], 0
        for b in range(batch):
            imgs = list(range(nxt, nxt + counts[b]))
            nxt += counts[b]
            pos = positions[b]
            need = sum(geoms[i].num_tokens for i in imgs)
            if len(pos) != need:
                raise ValueError(f"row {b}: {len(pos)} image tokens, but its images {imgs} need {need} "
                                 f"({[geoms[i].num_tokens for i in imgs]})")
            true_starts, true_ends, k = [], [], 0
            for i in imgs:
                t = geoms[i].num_tokens
                run = pos[k : k + t]
                if run[-1] - run[0] != t - 1:
                    raise ValueError(f"row {b}: the {t} tokens of image {i} are not contiguous")
                true_starts.append(run[0])
                true_ends.append(run[0] + t)
                k += t
            samples.append(self._sample_indexes(input_ids[b, : lengths[b]], imgs, true_starts, true_ends, geoms))
        return samples

    def _sample_indexes(self, ids: torch.Tensor, imgs: list[int], true_starts: list[int], true_ends: list[int],
                        geoms: list[ImageGeometry]) -> _Sample:
        if not imgs:
            return _Sample([], [], [], None, [], [])
        s, n = self.settings, self.num_patches
        tokens = [geoms[i].num_tokens for i in imgs]
        lengths = [geoms[i].manager_len for i in imgs]

        def unexpanded(p: int) -> int:
            # Position in the original ids, where each image is one -200 token.
            return p - sum(t - 1 for st, t in zip(true_starts, tokens) if st < p)

        unexp_starts = [unexpanded(p) for p in true_starts]
        if len(imgs) > 1 and s.convention == "original":
            starts = [u - k + k * n for k, u in enumerate(unexp_starts)]  # assumes 729 per image
        else:
            starts = list(true_starts)
        full_len = ids.shape[0]
        unexp_len = full_len - sum(t - 1 for t in tokens)
        im_pos = torch.nonzero(ids == s.im_start_id).flatten().tolist()
        picked = im_pos[1:3]
        if not picked:  # plain prompt: <image>caption\n
            query = (-1, full_len, lengths[-1])
        else:
            q0 = unexpanded(picked[0])
            third = unexpanded(picked[1]) if len(picked) > 1 else unexp_len
            q1 = third - 2 + tokens[0]
            q2 = unexp_starts[0] + tokens[0]
            query = (q0, q1, q2)
        third = -1 if not picked else (picked[1] if len(picked) > 1 else full_len)
        return _Sample(imgs, starts, lengths, query, true_starts, true_ends, third)

    # ------------------------------------------------------------------ manager math
    def _jitter(self, jitter: Mapping[int, JitterValue] | None, j: int, shape: tuple[int, ...], b: int):
        if jitter is None or j not in jitter:
            return None
        value = jitter[j]
        return value(shape, b) if callable(value) else value

    def _static(self, j: int, feats: torch.Tensor, jit: torch.Tensor | None) -> torch.Tensor:
        """StaticManagerZeroInit: sum_n A[n] * F[n] (F: [B, N, L, D]) -> [B, L, D]."""
        scores = self.manager_params[f"model.manager.{j}.layer_scores"]
        if self.settings.injection_layers[j] == 0:
            feats = feats[:, :-1]  # layer 0 ignores the last selected layer
        if jit is not None:
            scores = scores * jit
        return torch.sum(scores * feats, dim=1)

    def _adaptive(self, j: int, feats: torch.Tensor, query: torch.Tensor, extra: torch.Tensor | None,
                  jitter: Mapping[int, JitterValue] | None, b: int) -> torch.Tensor:
        """AdaptiveManagerZeroInit (SPEC §2.7). feats [B, N, L, D], query Q [B, L, D], extra [1, Lq, D]."""
        p = self.manager_params
        prefix = f"model.manager.{j}"
        weight, gate = p[f"{prefix}.linear_controller.weight"], p[f"{prefix}.zero_gate"]
        qt = self.settings.query_type
        if qt == "none":
            fused = query
        else:
            if extra is None:
                extra = query  # the original prints a warning and uses Q itself
            if qt == "cross":
                extra = extra.expand(query.shape[0], -1, -1)
                q = nnf.linear(query, p[f"{prefix}.fusion_attention.q_proj.weight"],
                               p[f"{prefix}.fusion_attention.q_proj.bias"])
                k = nnf.linear(extra, p[f"{prefix}.fusion_attention.k_proj.weight"],
                               p[f"{prefix}.fusion_attention.k_proj.bias"])
                att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hidden)
                fused = torch.cat((torch.softmax(att, dim=-1) @ extra, query), dim=-1)
            else:
                e = extra[:, -1] if qt == "last" else torch.mean(extra, dim=1)
                e = e.unsqueeze(1).expand(query.shape[0], feats.shape[2], -1)
                fused = torch.cat((e, query), dim=-1)
        scores = nnf.linear(fused, weight).transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, self.hidden)
        jit = self._jitter(jitter, j, tuple(scores.shape), b)
        if jit is not None:
            scores = scores * jit
        return torch.sum(scores * gate * feats, dim=1)

    def _run_manager(self, j: int, feats: torch.Tensor, query: torch.Tensor | None, extra: torch.Tensor | None,
                     jitter: Mapping[int, JitterValue] | None, b: int) -> torch.Tensor:
        if self.settings.is_static_block(j):
            shape = (1, self.settings.num_scores(j), 1, self.hidden)
            return self._static(j, feats, self._jitter(jitter, j, shape, b))
        return self._adaptive(j, feats, query, extra, jitter, b)

    def _inject(self, h: torch.Tensor, j: int, samples: list[_Sample], multi: list[torch.Tensor],
                seq_len: int, max_len: int, jitter: Mapping[int, JitterValue] | None) -> torch.Tensor:
        """One injection before decoder layer injection_layers[j] (SPEC §2.6). seq_len: the original S."""
        s, n = self.settings, self.num_patches
        static_type = "static" in s.manager_type
        offset = n if s.grid_type == "grid" else 0
        h = h.clone()
        for b, smp in enumerate(samples):
            if not smp.images:
                continue
            if len(smp.images) == 1:
                start, length = smp.starts[0], smp.lengths[0]
                if start == seq_len:  # cut exactly before the image: the original adds nothing
                    continue
                if start > seq_len:
                    raise ValueError(f"row {b}: the image starts at {start}, beyond the cut length {seq_len}; "
                                     "the original code cannot handle an image truncated away")
                feats = multi[smp.images[0]][None]  # [1, N, L, D]
                lo = start + offset
                if static_type:
                    eff = min(start + length, seq_len) - start  # the clip ignores the offset (original)
                    hi = min(lo + eff, seq_len)
                    if hi - max(lo, 0) != eff:
                        raise ValueError(f"row {b}: the manager update ({eff} tokens from {lo}) runs past the "
                                         f"sequence end {seq_len}; the original crashes here (shape mismatch)")
                    query = None
                else:
                    hi = min(lo + length, seq_len)
                    eff = max(hi - lo, 0)
                    query = h[b, lo:hi][None].clone()
                if eff == 0:
                    continue
                extra = self._extra_query_one(h, b, smp, seq_len)
                out = self._run_manager(j, feats[:, :, :eff], query, extra, jitter, b)
                h[b, lo : lo + eff] += out[0]
                continue
            # More than one image: eval-only path, 729 tokens per image, no offset.
            if max_len != n:
                raise ValueError(f"row {b} has {len(smp.images)} images: the original needs {n} manager tokens "
                                 f"per image (batch maximum is {max_len}); use pad/square for multi-image rows")
            feats = torch.stack([multi[i] for i in smp.images], dim=0)  # [n_img, N, 729, D]
            query = None
            if not static_type:
                rows = []
                for st in smp.starts:
                    piece = h[b, st : min(st + n, seq_len)]
                    if piece.shape[0] < n:  # zero-pad slices cut by truncation
                        piece = torch.cat([piece, piece.new_zeros(n - piece.shape[0], piece.shape[1])], dim=0)
                    rows.append(piece)
                query = torch.stack(rows, dim=0)
            extra = self._extra_query_multi(h, b, smp, seq_len)
            out = self._run_manager(j, feats, query, extra, jitter, b)
            for k, (st, ln) in enumerate(zip(smp.starts, smp.lengths)):
                cnt = min(seq_len, st + ln) - min(seq_len, st)
                if cnt > 0:
                    h[b, st : st + cnt] += out[k, :cnt]
        return h

    def _extra_query_one(self, h: torch.Tensor, b: int, smp: _Sample, seq_len: int) -> torch.Tensor | None:
        if self.settings.query_type not in ("last", "average", "cross"):
            return None
        q0, q1, q2 = smp.query
        if q0 == -1:  # plain: [q2, min(q1-1, S))
            idx = list(range(q2, min(q1 - 1, seq_len)))
        else:
            idx = list(range(q0 + 3, smp.starts[0]))[:-1]  # text before the image minus the assumed "\n"
            q_start, q_end = min(q2, seq_len) + 1, min(q1 - 1, seq_len)
            if q_end > q_start:
                idx.extend(range(q_start, q_end))
        if not idx:
            return None
        return h[b, idx][None]

    def _extra_query_multi(self, h: torch.Tensor, b: int, smp: _Sample, seq_len: int) -> torch.Tensor | None:
        if self.settings.query_type not in ("last", "average", "cross"):
            return None
        n, count = self.num_patches, len(smp.images)
        if self.settings.convention == "hf" and smp.third_im_start >= 0:
            # Real geometry: from after the last image's "\n" to the user turn's <|im_end|>.
            q_start = smp.true_ends[-1] + 1
            q_end = min(smp.third_im_start - 2, seq_len)
        else:
            q_start = smp.starts[-1] + n + 1
            q_end = min(smp.query[1] + n * (count - 1) - count, seq_len)
        if q_end <= q_start:
            return None
        return h[b, q_start:q_end][None]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        jitter: Mapping[int, JitterValue] | None = None,
        batch_num_images: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, S', V] (fp32) and the mean shifted CE loss (None without labels).

        input_ids [B, S] (right padded, image tokens expanded); attention_mask [B, S] (1 = token);
        labels [B, S] unshifted with -100 = ignored. S' = min(S, model_max_length).
        jitter: {j: tensor or fn(shape, row) -> tensor} multiplying manager j's scores
        ([1, N_j, 1, D] static, [n_img, N, L, D] adaptive, drawn per row in the original);
        None = evaluation (no jitter). batch_num_images: images per row, needed for rows with
        several images when image_aspect_ratio is anyres* (they then get one crop each).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1).tolist()
        for b in range(batch):
            if not bool(mask[b, : lengths[b]].all()):
                raise ValueError(f"row {b}: only right padding is supported (the original pads right)")
        if pixel_values is None:
            geoms: list[ImageGeometry] = []
            mains: list[torch.Tensor] = []
            multis: list[torch.Tensor] = []
        else:
            if image_sizes is None:
                raise ValueError("image_sizes is required with pixel_values")
            geoms = self._geometries(image_sizes, batch_num_images)
            sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else list(image_sizes)
            enc_main, enc_multi = self._encode(pixel_values, geoms)
            pairs = [self._assemble(m, mm, g, sz) for m, mm, g, sz in zip(enc_main, enc_multi, geoms, sizes)]
            mains, multis = [p[0] for p in pairs], [p[1] for p in pairs]
        samples = self._bookkeeping(input_ids, lengths, geoms, batch_num_images)

        lm = self.hf.model.language_model
        embeds = lm.embed_tokens(input_ids)
        embeds = embeds.clone()
        for b, smp in enumerate(samples):
            for i, st in zip(smp.images, smp.true_starts):
                embeds[b, st : st + mains[i].shape[0]] = mains[i].to(embeds.dtype)

        # Truncate after expansion (tokenizer_model_max_length); S = the original padded length.
        cut = self.settings.model_max_length
        if cut is not None and cut < seq:
            embeds, mask, seq = embeds[:, :cut], mask[:, :cut], cut
            input_ids = input_ids[:, :cut]
            if labels is not None:
                labels = labels[:, :cut]
        seq_len = max([min(x, seq) for x in lengths] + [0])
        max_len = max([x for smp in samples for x in smp.lengths] + [0])

        positions = torch.arange(seq, device=device)[None].expand(batch, seq)
        position_embeddings = lm.rotary_emb(embeds, positions)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & mask[:, None, :]
        additive = torch.zeros(batch, 1, seq, seq, dtype=embeds.dtype, device=device)
        additive = additive.masked_fill(~allowed[:, None], torch.finfo(embeds.dtype).min)

        h = embeds
        injections = {layer: j for j, layer in enumerate(self.settings.injection_layers)}
        for layer_idx, layer in enumerate(lm.layers):
            if layer_idx in injections and multis:
                h = self._inject(h, injections[layer_idx], samples, multis, seq_len, max_len, jitter)
            h = layer(h, attention_mask=additive, position_embeddings=position_embeddings, position_ids=positions)
        h = lm.norm(h)
        logits = self.hf.lm_head(h).float()

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(device)
            loss = nnf.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
        return logits, loss


def reference_from_hf_and_manager(
    hf_model: nn.Module, manager_params: Mapping[str, torch.Tensor], settings: ManagerSettings
) -> TorchManagerReference:
    """Build the reference around an HF LlavaOnevisionForConditionalGeneration (put in eval mode)."""
    ref = TorchManagerReference(hf_model, manager_params, settings)
    ref.eval()
    return ref
