"""`verify --torch PATH --jax DIR`: the PyTorch reference and our model on the same generated image
and prompt; max |logit diff|, KL and top-1 agreement, non-zero exit above the thresholds.

The reference is transformers' LlavaOnevision for HF checkpoints without a Manager, and the
Manager reference (`manager_jax.reference.torch_manager`, on top of the same transformers modules)
otherwise. Original-layout baselines run through the Manager reference with all-zero scores (a
no-op Manager), because only it has the original's image handling (flat merge, int() unpad, no
newline after single-crop images). Everything runs in fp32 on CPU, the reference's weights rounded
to the dtype each one is stored in under --jax (a bf16 conversion is checked against the same bf16
values, so rounding alone moves no logit and the thresholds stay tight enough for layout bugs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from manager_jax import exit_status, params_io
from manager_jax.config import ModelConfig
from manager_jax.data.conversation import IMAGE_TOKEN_INDEX
from tools.convert_weights import configs_out, mapping
from tools.convert_weights.sources import ConversionError, TorchSource, detect_format, open_torch_source


@dataclass
class VerifyReport:
    """Logit agreement over the compared token positions (fp64 statistics of fp32 logits)."""

    tokens: int
    max_abs_diff: float
    relative_error: float  # ||ours - ref|| / ||ref||
    mean_kl: float  # mean over tokens of KL(ref || ours)
    max_kl: float
    top1_agreement: float
    reference: str
    rounded_to: tuple[str, ...] = ()  # dtypes the reference's weights were rounded to (those of --jax)

    def failures(self, max_kl: float = 1e-4, max_logit_diff: float | None = None, min_top1: float = 1.0,
                 max_rel_error: float | None = 1e-4) -> list[str]:
        out = []
        if not math.isfinite(self.mean_kl) or self.mean_kl > max_kl:
            out.append(f"mean KL {self.mean_kl:.3e} > {max_kl:.1e}")
        # The near-uniform logits of a random model hide a wrong layout (e.g. RoPE-permuted q/k rows:
        # KL 1.6e-8) from the KL; the relative error sees it (1.1e-3, against 2e-7 when correct).
        if max_rel_error is not None and not self.relative_error <= max_rel_error:
            out.append(f"relative error {self.relative_error:.3e} > {max_rel_error:.1e}")
        if max_logit_diff is not None and not self.max_abs_diff <= max_logit_diff:
            out.append(f"max |logit diff| {self.max_abs_diff:.3e} > {max_logit_diff:.1e}")
        if self.top1_agreement < min_top1:
            out.append(f"top-1 agreement {self.top1_agreement:.4f} < {min_top1}")
        return out

    def __str__(self) -> str:
        rounded = f" (weights rounded to {', '.join(self.rounded_to)} as stored in --jax)" if self.rounded_to else ""
        return (f"reference: {self.reference}{rounded}\ncompared tokens: {self.tokens}\n"
                f"max |logit diff|: {self.max_abs_diff:.3e}\nrelative error: {self.relative_error:.3e}\n"
                f"KL(torch || jax): mean {self.mean_kl:.3e}, max {self.max_kl:.3e}\n"
                f"top-1 agreement: {self.top1_agreement:.4f}")


def compare_logits(ours: np.ndarray, ref: np.ndarray, valid: np.ndarray, reference: str = "",
                   chunk: int = 256, rounded_to: tuple[str, ...] = ()) -> VerifyReport:
    """Statistics of two [B, S, V] logit arrays over the positions where `valid` [B, S] is True.

    Computed in fp64, `chunk` tokens at a time (a 150k vocabulary makes whole-sequence fp64 copies
    several GB).
    """
    rows = np.argwhere(np.asarray(valid))
    if np.shape(ours) != np.shape(ref) or len(rows) == 0:
        raise ValueError(f"logits to compare have shapes {np.shape(ours)} / {np.shape(ref)}, {len(rows)} valid")
    max_diff, sq_diff, sq_ref, kls, agree = 0.0, 0.0, 0.0, [], 0
    for start in range(0, len(rows), chunk):
        idx = tuple(rows[start:start + chunk].T)
        a = np.asarray(ours[idx], np.float64)
        b = np.asarray(ref[idx], np.float64)
        log_p = b - _logsumexp(b)
        log_q = a - _logsumexp(a)
        kls.append(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
        max_diff = max(max_diff, float(np.max(np.abs(a - b))))
        sq_diff += float(np.sum((a - b) ** 2))
        sq_ref += float(np.sum(b**2))
        agree += int(np.sum(a.argmax(-1) == b.argmax(-1)))
    kl = np.concatenate(kls)
    return VerifyReport(
        tokens=len(rows),
        max_abs_diff=max_diff,
        relative_error=math.sqrt(sq_diff) / max(math.sqrt(sq_ref), 1e-30),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        top1_agreement=agree / len(rows),
        reference=reference,
        rounded_to=rounded_to,
    )


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---- inputs ------------------------------------------------------------------------------------------


def special_ids(cfg: ModelConfig) -> tuple[int, int, int]:
    """(<|im_start|>, <|im_end|>, "\\n") ids: Qwen2's when the vocabulary has them, else stand-ins."""
    v = cfg.text.vocab_size
    if v > 151645:
        return 151644, 151645, 198
    return v - 62, v - 61, 198 if v > 250 else 1


def test_prompt(cfg: ModelConfig, seed: int = 0) -> list[int]:
    """A chat-shaped prompt (system, user turn with one image, assistant answer; SPEC §4 layout)."""
    rng = np.random.default_rng(seed)
    ims, ime, nl = special_ids(cfg)
    hi = min(cfg.text.vocab_size - 100, 150000)

    def text(n):
        return [int(x) for x in rng.integers(1, hi, n)]

    return ([ims] + text(5) + [ime, nl, ims] + text(1) + [nl] + text(4) + [IMAGE_TOKEN_INDEX] + text(6)
            + [ime, nl, ims] + text(1) + [nl] + text(8) + [ime, nl])


def build_inputs(cfg: ModelConfig, image_size: tuple[int, int], seed: int = 0):
    """The shared case: our batch and the HF-layout tensors for one generated image + prompt."""
    from manager_jax.reference.parity import SampleSpec, build_case

    return build_case(cfg, [SampleSpec(test_prompt(cfg, seed), [image_size])], seed=seed,
                      im_start_id=special_ids(cfg)[0])


# ---- the PyTorch side ---------------------------------------------------------------------------------


def _settings(cfg: ModelConfig):
    from manager_jax.reference.torch_manager import ManagerSettings

    m = cfg.manager
    pinpoints = cfg.image.grid_pinpoints if cfg.image.grid_pinpoints is not None else "(1x1),...,(6x6)"
    return ManagerSettings(
        manager_type=m.type or "static_zerouni",
        grid_type=m.grid_type,
        select_layers=m.select_layers if m.enabled else [1, 2],
        injection_layers=cfg.injection_layers() if m.enabled else [0],
        convention=cfg.image.convention,
        image_aspect_ratio=cfg.image.aspect_ratio,
        merge_type=cfg.image.patch_merge_type,
        image_grid_pinpoints=pinpoints,
        im_start_id=special_ids(cfg)[0],
    )


def stored_dtypes(cfg: ModelConfig, params: dict) -> dict[str, str]:
    """Original key -> "bfloat16" / "float16" for each tensor whose parameter --jax stores that narrow."""
    out = {}
    for spec in mapping.param_specs(cfg):
        name = np.dtype(mapping.get_path(params, spec.path).dtype).name
        if name in ("bfloat16", "float16"):
            out.update({t.key: name for t in mapping.tensor_specs(spec)})
    return out


def _rounded(x, dtype_name: str | None):
    import torch

    return x.to(getattr(torch, dtype_name)).to(x.dtype) if dtype_name else x


def _read_torch(source: TorchSource, keys) -> dict:
    import torch

    out = {}
    for key in keys:
        ref = source.refs[key]
        out[key] = torch.from_numpy(np.asarray(ref.checkpoint.read(ref.file_key), dtype=np.float32).copy())
    return out


def _hf_model_from_original(source: TorchSource):
    """transformers LlavaOnevision holding the tensors of an original-layout checkpoint (fp32)."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.initialization import no_init_weights

    cfg = source.config
    hf_config = LlavaOnevisionConfig.from_dict(configs_out.hf_config(cfg, np.dtype(np.float32)))
    with no_init_weights():
        model = LlavaOnevisionForConditionalGeneration._from_config(hf_config, dtype=torch.float32,
                                                                    attn_implementation="sdpa")
    keys = [k for k in source.refs if not k.startswith("model.manager")]
    state = {mapping.to_layout(k, "hf_memory"): v for k, v in _read_torch(source, keys).items()}
    if not cfg.image.has_newline:  # flat models have none; HF always has one (unused by the reference)
        state["model.image_newline"] = torch.zeros(cfg.text.hidden_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ConversionError(source.path, [f"HF model does not take the checkpoint: missing {missing}, "
                                            f"unexpected {unexpected}"])
    if cfg.text.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def torch_logits(source: TorchSource, case, stored: Mapping[str, str] | None = None) -> tuple[np.ndarray, str]:
    """Reference logits [B, S, V] for a case built by `build_inputs`, and the reference's name.

    `stored` (from `stored_dtypes`): original key -> dtype to round that weight to first.
    """
    import torch

    from manager_jax.reference.torch_manager import init_manager_params, reference_from_hf_and_manager

    cfg = source.config
    if source.kind == "hf":
        from transformers import LlavaOnevisionForConditionalGeneration

        hf = LlavaOnevisionForConditionalGeneration.from_pretrained(source.path, dtype=torch.float32,
                                                                    attn_implementation="sdpa").eval()
    else:
        hf = _hf_model_from_original(source)
    stored = stored or {}
    with torch.no_grad():
        for name, p in hf.named_parameters():  # a tied lm_head is listed (and rounded) once, as the embedding
            p.copy_(_rounded(p, stored.get(mapping.from_layout(name, "hf_memory"))))
    inputs = {k: torch.from_numpy(v) for k, v in case.hf_inputs.items() if k != "labels"}
    with torch.no_grad():
        if source.kind == "hf" and not cfg.manager.enabled:
            logits = hf(**inputs, batch_num_images=torch.tensor(case.batch_num_images)).logits
            return logits.float().numpy(), "transformers LlavaOnevisionForConditionalGeneration"
        settings = _settings(cfg)
        if cfg.manager.enabled:
            manager = {k: _rounded(v, stored.get(k)) for k, v in
                       _read_torch(source, [k for k in source.refs if k.startswith("model.manager")]).items()}
            name = f"Manager reference ({cfg.manager.type}, {cfg.image.convention} convention)"
        else:  # zero scores: the Manager adds nothing, only the original image handling remains
            manager = init_manager_params(settings, cfg.text.hidden_size, nonzero=False)
            name = "Manager reference with a zero Manager (original-layout baseline)"
        ref = reference_from_hf_and_manager(hf, manager, settings)
        logits, _ = ref(**inputs, batch_num_images=case.batch_num_images)
    return logits.float().numpy(), name


# ---- our side ----------------------------------------------------------------------------------------


def jax_logits(cfg: ModelConfig, params: dict, case) -> np.ndarray:
    """Our model's fp32 logits [B, S, V] with `params` (a pure tree) on the case's batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from manager_jax.models.llava_ov import LlavaOV

    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    model = nnx.eval_shape(lambda: LlavaOV(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    params_state = nnx.state(model, nnx.Param)
    problems = params_io.check_tree(params, nnx.to_pure_dict(params_state))
    if problems:
        raise ConversionError("--jax", ["params do not fit the model:"] + problems)
    # Build the model directly from the loaded arrays: no random initialisation of a full model.
    filled = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    nnx.replace_by_pure_dict(state, filled)
    model = nnx.merge(graphdef, state)
    return np.asarray(model(jax.tree.map(jnp.asarray, case.batch.to_model_inputs())))


# ---- entry points -------------------------------------------------------------------------------------


def _same_model(a: ModelConfig, b: ModelConfig) -> list[str]:
    problems = []
    for name in ("text", "vision", "manager"):
        if getattr(a, name) != getattr(b, name):
            problems.append(f"{name} config differs:\n  torch: {getattr(a, name)}\n  jax:   {getattr(b, name)}")
    ia, ib = a.image, b.image
    if (ia.aspect_ratio, ia.patch_merge_type, ia.convention) != (ib.aspect_ratio, ib.patch_merge_type, ib.convention):
        problems.append(f"image config differs: torch {ia}, jax {ib}")
    if configs_out.expand_pinpoints(ia.grid_pinpoints) != configs_out.expand_pinpoints(ib.grid_pinpoints):
        problems.append("image_grid_pinpoints differ")
    if a.image_token_id != b.image_token_id:
        problems.append(f"image_token_id differs: torch {a.image_token_id}, jax {b.image_token_id}")
    return problems


def verify(torch_path: str, jax_path: str, *, image_size: tuple[int, int] = (512, 384), seed: int = 0) -> VerifyReport:
    """Runs both models on the same generated input; raises ConversionError when they are not comparable."""
    source = open_torch_source(torch_path, detect_format(torch_path))
    try:
        jcfg, params = params_io.load_params(jax_path)
    except params_io.ParamsError as e:
        raise ConversionError(jax_path, [str(e)]) from None
    problems = _same_model(source.config, jcfg)
    if problems:
        raise ConversionError(f"{torch_path} vs {jax_path}", problems)
    case = build_inputs(jcfg, image_size, seed)
    stored = stored_dtypes(jcfg, params)
    ref, name = torch_logits(source, case, stored)
    ours = jax_logits(jcfg, params, case)
    if ours.shape != ref.shape:
        raise ConversionError(jax_path, [f"logits shapes differ: ours {ours.shape}, reference {ref.shape}"])
    return compare_logits(ours, ref, case.valid, name, rounded_to=tuple(sorted(set(stored.values()))))


def verify_cli(args) -> int:
    """The `verify` subcommand: prints the report; exit status 0 within the thresholds, else 1 (FAILED)."""
    report = verify(args.torch_path, args.jax_path, image_size=args.image_size, seed=args.seed)
    print(report)
    failures = report.failures(args.max_kl, args.max_logit_diff, args.min_top1, args.max_rel_error)
    if failures:
        print("FAILED: " + "; ".join(failures))
        return exit_status.FAILED
    print("OK")
    return exit_status.OK
