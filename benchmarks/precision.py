"""Low-precision parity: our model vs the PyTorch reference (transformers + the Manager reference),
stage by stage, in float32, bfloat16 and float16, on a tiny random model with non-zero Manager
parameters.

    python benchmarks/precision.py [--types static_zerouni adaptive_zerouni] [--text-attn sdpa|eager]

Both sides get the same fp32 weights rounded to the run dtype, and the same inputs. Per stage it
prints the relative error ||a - b|| / ||b|| of

- ours@dt vs ref@dt: what a user comparing "number for number" in that dtype sees;
- ref@dt vs ref@fp32: the reference's own rounding noise in that dtype (the yardstick);
- ours@dt vs ref@fp32.

Stages: the tower's last hidden state, the projector output (main features), the Manager's
multi-layer features (projected, plus the layer embedding), each Manager block's aggregated
update, the input of each decoder layer (after the injection where there is one), each decoder
layer's output, the logits. The reference runs the SigLIP tower in eager attention (the original's
custom class) and the decoder in SDPA (the original evaluation; `--text-attn eager` for HF eager).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from manager_jax.config import ImageConfig, ManagerConfig, ModelConfig  # noqa: E402
from manager_jax.data.conversation import IMAGE_TOKEN_INDEX as IMG  # noqa: E402
from manager_jax.models.layers import unstack_layers  # noqa: E402
from manager_jax.reference.hf_tiny import tiny_hf_config, tiny_hf_model  # noqa: E402
from manager_jax.reference.parity import SampleSpec, build_case, jax_model_from_torch  # noqa: E402
from manager_jax.reference.torch_manager import (ManagerSettings, init_manager_params,  # noqa: E402
                                                 reference_from_hf_and_manager)

DTYPES = ("float32", "bfloat16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMS, IME, NL = 450, 451, 198  # <|im_start|>, <|im_end|>, "\n" stand-ins inside the tiny vocabulary


def chat_ids(seed: int = 3) -> list[int]:
    """A system turn, a user turn with text around one image, an assistant turn."""
    rng = np.random.default_rng(seed)
    t = lambda n: [int(v) for v in rng.integers(1, 400, n)]
    user = t(3) + [IMG] + t(2)
    return [IMS] + t(4) + [IME, NL, IMS, 7, NL] + user + t(5) + [IME, NL, IMS, 8, NL] + t(6) + [IME, NL]


def setup(manager_type: str, *, image_size=(700, 330), vision_layers=4, text_layers=4, seed=1, grid_type="all"):
    """The fp32 HF model, our config, the reference settings, the Manager params and the case."""
    hf = tiny_hf_model(tiny_hf_config(vision_layers=vision_layers, text_layers=text_layers), seed=seed,
                       attn_implementation="eager")
    base = ModelConfig.from_hf_config(hf.config.to_dict())
    image = ImageConfig(grid_pinpoints=base.image.grid_pinpoints, convention="original")
    manager = ManagerConfig(type=manager_type, grid_type=grid_type, vision_select_layers_start=1,
                            vision_select_layers_end=vision_layers + 1, injection_start=0, injection_interval=2,
                            injection_end=text_layers)
    cfg = base.replace(image=image, manager=manager)
    settings = ManagerSettings(
        manager_type=manager_type, grid_type=grid_type, select_layers=manager.select_layers,
        injection_layers=cfg.injection_layers(), convention="original", image_aspect_ratio=image.aspect_ratio,
        merge_type=image.patch_merge_type, image_grid_pinpoints=base.image.grid_pinpoints, im_start_id=IMS,
    )
    mparams = init_manager_params(settings, cfg.text.hidden_size, seed=0, nonzero=True)
    case = build_case(cfg, [SampleSpec(chat_ids(), [image_size])], seed=0, im_start_id=IMS)
    return hf, cfg, settings, mparams, case


# ---------------------------------------------------------------------------------------- reference
def reference_model(hf, dtype: str, text_attn: str = "sdpa", conv_bias: str = "gpu", linear_bias: str = "addmm"):
    """A copy of the HF model in `dtype`, as the original runs it: SigLIP attention eager (its
    custom class has no other), the decoder in `text_attn`, and RoPE's inverse frequencies kept in
    fp32: `.to(dtype)` would round that buffer, which the original computes in fp32 (SPEC §1.4).

    `conv_bias="gpu"`: the patch embedding's bias is added after the convolution's output is
    rounded, as PyTorch's cuDNN convolution does (the original ran on GPUs); on CPU oneDNN adds it
    inside the convolution ("cpu"), one rounding fewer.

    `linear_bias="addmm"`: nn.Linear as PyTorch runs it, the bias added to the fp32 accumulator;
    "rounded": the matmul's output rounded, then the bias added, as our model does on purpose
    (manager_jax.models.layers.linear), to measure everything else."""
    model = copy.deepcopy(hf).to(TORCH_DTYPES[dtype])
    if conv_bias == "gpu" and dtype != "float32":
        conv = model.model.vision_tower.embeddings.patch_embedding
        conv.forward = lambda x, conv=conv: torch.nn.functional.conv2d(
            x, conv.weight, None, conv.stride, conv.padding) + conv.bias[None, :, None, None]
    if linear_bias == "rounded" and dtype != "float32":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.forward = lambda x, m=module: torch.nn.functional.linear(x, m.weight) + m.bias
    model.config.vision_config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = text_attn
    rotary, rotary32 = model.model.language_model.rotary_emb, hf.model.language_model.rotary_emb
    for name in ("inv_freq", "original_inv_freq"):
        if hasattr(rotary32, name):
            setattr(rotary, name, getattr(rotary32, name).clone())
    return model


def run_reference(hf, settings, mparams, case, dtype: str, text_attn: str = "sdpa",
                  conv_bias: str = "gpu", linear_bias: str = "addmm") -> dict[str, np.ndarray]:
    """Per-stage outputs of the PyTorch reference with every weight and input in `dtype`."""
    model = reference_model(hf, dtype, text_attn, conv_bias, linear_bias)
    ref = reference_from_hf_and_manager(model, mparams, settings)
    out: dict[str, np.ndarray] = {}
    hooks = []
    tower = model.model.vision_tower
    hooks.append(tower.register_forward_hook(
        lambda m, a, kw, o: out.__setitem__("vision_last", o.hidden_states[-1]), with_kwargs=True))
    projected = []
    hooks.append(model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: projected.append(o)))
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: out.__setitem__(f"layer{i}_in", a[0] if a else kw["hidden_states"]), with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(f"layer{i}_out", o[0] if isinstance(o, tuple) else o)))
    updates = []
    run_manager = ref._run_manager
    ref._run_manager = lambda *a, **k: (lambda o: (updates.append(o), o)[1])(run_manager(*a, **k))
    encode = ref._encode
    ref._encode = lambda *a, **k: (lambda r: (out.__setitem__("manager_features", torch.cat(r[1])), r)[1])(
        encode(*a, **k))
    inputs = {k: torch.from_numpy(v) for k, v in case.hf_inputs.items() if k != "labels"}
    try:
        with torch.no_grad():
            logits, _ = ref(**inputs, batch_num_images=case.batch_num_images)
    finally:
        for h in hooks:
            h.remove()
    out["projector_main"] = projected[0]
    out["logits"] = logits
    # Manager j's update, placed at its destination rows of the [B, S, D] sequence.
    seq = out["layer0_in"]
    samples = ref._bookkeeping(inputs["input_ids"], inputs["attention_mask"].sum(1).tolist(),
                               ref._geometries(inputs["image_sizes"], case.batch_num_images), case.batch_num_images)
    offset = 729 if settings.grid_type == "grid" else 0
    for j, upd in enumerate(updates):
        full = torch.zeros(seq.shape, dtype=torch.float32)
        start = samples[0].starts[0] + offset
        full[0, start:start + upd.shape[1]] = upd[0].float()
        out[f"manager{j}_update"] = full
    return {k: v.float().numpy() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- ours
def our_model(cfg: ModelConfig, hf, mparams, dtype: str):
    """Our model with the fp32 weights rounded to `dtype`, computing in `dtype`."""
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    model = jax_model_from_torch(cfg, hf, mparams)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), params))
    return model


def compiled(fn, *, excess_precision: bool = True):
    """`fn(*args)` compiled, nnx modules among the args split into graph and state. With
    `excess_precision=False`, XLA keeps every rounding to bf16 / fp16 the program asks for (by
    default, `xla_allow_excess_precision`, it may keep a fused intermediate in fp32, e.g. a
    Linear's output feeding the attention matmul, where PyTorch rounds)."""
    options = None if excess_precision else {"xla_allow_excess_precision": False}

    def call(*args):
        parts = [nnx.split(a) if isinstance(a, nnx.Module) else (None, a) for a in args]
        defs = [d for d, _ in parts]

        def inner(*values):
            return fn(*[v if d is None else nnx.merge(d, v) for d, v in zip(defs, values)])

        return jax.jit(inner, compiler_options=options)(*[v for _, v in parts])

    return call


def run_ours(model, case, excess_precision: bool = True) -> dict[str, np.ndarray]:
    """Per-stage outputs of our model, each stage compiled as the model runs in training and
    inference (see `compiled`)."""
    jit = lambda fn: compiled(fn, excess_precision=excess_precision)
    batch = jax.tree.map(jnp.asarray, case.batch.to_model_inputs())
    out: dict[str, np.ndarray] = {}
    n_crops = int(case.batch.crop_mask.sum())
    cfg = model.cfg
    select = cfg.manager.select_layers
    last, _ = jit(lambda m, px: m.vision(px, select))(model, batch["pixel_values"])
    out["vision_last"] = last[:n_crops]
    out["projector_main"] = jit(lambda m, x: m.projector(x))(model, last)[:n_crops]
    _, mgr = jit(lambda m, px: m.encode_images(px))(model, batch["pixel_values"])
    n = mgr.shape[0]
    out["manager_features"] = mgr.reshape(n, -1, 729, mgr.shape[-1])[:, :n_crops].transpose(1, 0, 2, 3)

    h, mtok = jit(lambda m, bt: m.embed(bt))(model, batch)
    ctx = model.text.context(batch["positions"], batch["segment_ids"])
    injections = cfg.injection_layers()
    b, s, d = h.shape

    def inject(m, j, h, mtok):
        captured = []
        block = m.manager.blocks[j]
        weights = type(block).weights
        type(block).weights = lambda self, *a: (lambda o: (captured.append(o), o)[1])(weights(self, *a))
        try:
            new = m.manager.inject(j, h, mtok, None)
        finally:
            type(block).weights = weights
        upd = jnp.where(mtok.active[:, None], captured[0], 0).astype(jnp.float32)
        return new, jnp.zeros((b * s, d)).at[mtok.dst].add(upd, mode="drop").reshape(b, s, d)

    run_layer = jit(lambda layer, h, ctx: layer(h, ctx)[0])
    for i, layer in enumerate(unstack_layers(model.text.layers)):
        if i in injections:
            j = injections.index(i)
            h, out[f"manager{j}_update"] = jit(lambda m, h, t, j=j: inject(m, j, h, t))(model, h, mtok)
        out[f"layer{i}_in"] = h
        h = run_layer(layer, h, ctx)
        out[f"layer{i}_out"] = h
    out["logits"] = jit(lambda m, h: m.logits(m.text.norm(h)))(model, h)
    # The staged run against the model's own compiled forward (XLA may fuse across the stage bounds).
    out["logits_full_forward"] = jit(lambda m, bt: m(bt))(model, batch)
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ compare
def rel(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def stage_mask(name: str, case, ref_stage: np.ndarray) -> np.ndarray | None:
    if name.startswith("layer") or name.startswith("logits"):
        return case.valid
    if name.startswith("manager") and name.endswith("_update"):
        return np.abs(ref_stage).sum(-1) > 0  # the image rows that get an update
    return None


def measure(manager_type: str, dtypes=DTYPES, text_attn: str = "sdpa", conv_bias: str = "gpu",
            excess_precision: bool = True, linear_bias: str = "addmm", **setup_kw) -> dict:
    """{stage: {"ours_vs_ref@dt", "ref@dt_vs_ref@fp32", "ours@dt_vs_ref@fp32"}} for each dtype."""
    hf, cfg, settings, mparams, case = setup(manager_type, **setup_kw)
    refs = {dt: run_reference(hf, settings, mparams, case, dt, text_attn, conv_bias, linear_bias) for dt in dtypes}
    ours = {dt: run_ours(our_model(cfg, hf, mparams, dt), case, excess_precision) for dt in dtypes}
    result: dict[str, dict[str, float]] = {}
    refs = {dt: dict(r, logits_full_forward=r["logits"]) for dt, r in refs.items()}
    for name in ordered(refs[dtypes[0]], cfg.injection_layers()):
        row = {}
        for dt in dtypes:
            mask = stage_mask(name, case, refs["float32"][name] if "float32" in refs else refs[dt][name])
            row[f"ours_vs_ref@{dt}"] = rel(ours[dt][name], refs[dt][name], mask)
            if "float32" in refs and dt != "float32":
                row[f"ref@{dt}_vs_ref@fp32"] = rel(refs[dt][name], refs["float32"][name], mask)
                row[f"ours@{dt}_vs_ref@fp32"] = rel(ours[dt][name], refs["float32"][name], mask)
        result[name] = row
    return result


def ordered(names, injections=()) -> list[str]:
    """Pipeline order: tower, projector, features, then per decoder layer its update, input, output."""
    head = [n for n in ("vision_last", "projector_main", "manager_features") if n in names]
    layers = sorted({int(re.match(r"layer(\d+)_", n).group(1)) for n in names if n.startswith("layer")})
    out = list(head)
    for i in layers:
        if i in injections:
            out.append(f"manager{list(injections).index(i)}_update")
        out += [f"layer{i}_in", f"layer{i}_out"]
    out += [n for n in names if n not in out and n != "logits"]
    return out + ["logits"]


def print_table(manager_type: str, result: dict, dtypes=DTYPES) -> None:
    cols = ["ours_vs_ref@float32"] + [c for dt in dtypes if dt != "float32"
                                      for c in (f"ours_vs_ref@{dt}", f"ref@{dt}_vs_ref@fp32", f"ours@{dt}_vs_ref@fp32")]
    print(f"\n### {manager_type}\n")
    print("| stage | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in result:
        print(f"| {name} | " + " | ".join(f"{result[name].get(c, float('nan')):.2e}" for c in cols) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=["static_zerouni", "adaptive_zerouni"])
    p.add_argument("--text-attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--conv-bias", default="gpu", choices=["gpu", "cpu"],
                   help="where the reference adds the patch embedding's bias (see reference_model)")
    p.add_argument("--linear-bias", default="addmm", choices=["addmm", "rounded"],
                   help="how the reference adds nn.Linear biases (see reference_model)")
    p.add_argument("--no-excess-precision", action="store_true",
                   help="compile our stages with xla_allow_excess_precision=false (see `compiled`)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per manager type")
    args = p.parse_args()
    torch.set_num_threads(2)
    for t in args.types:
        result = measure(t, text_attn=args.text_attn, conv_bias=args.conv_bias, linear_bias=args.linear_bias,
                         excess_precision=not args.no_excess_precision)
        print_table(t, result)
        if args.json:
            print(json.dumps({"manager_type": t, "text_attn": args.text_attn, "conv_bias": args.conv_bias,
                              "linear_bias": args.linear_bias,
                              "excess_precision": not args.no_excess_precision,
                              "stages": result}))


if __name__ == "__main__":
    main()
