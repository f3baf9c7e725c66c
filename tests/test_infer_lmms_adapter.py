"""The lmms-eval adapter on Instance objects with local images.

lmms-eval is not installed (it is not installable offline and pulls many large packages), so the
requests are a stand-in with the attributes the adapter reads from lmms-eval's `Instance`
(`arguments` and the `args` property). Expected values: answers from the engine fed prompts built
here by the conversation module (one "<image>" per visual, pad mode for two images), and
log-likelihoods from the model's uncached full forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageFile

from manager_jax.data.conversation import build_eval_prompt, tokenizer_image_token
from manager_jax.data.tokenizer import load_tokenizer
from manager_jax.infer.engine import Prompt
from manager_jax.infer.lmms_adapter import LlavaOVManagerJax
from manager_jax.infer.sampling import SamplingParams
from manager_jax.reference.parity import random_image
from tests.test_infer_cli import LIMIT, checkpoint  # noqa: F401 (a shared fixture)
from tests.test_infer_engine import full_forward_logits

TASK, SPLIT = "demo_task", "test"


@dataclass
class Instance:
    """Stand-in for `lmms_eval.api.instance.Instance` (same `arguments` / `args`)."""

    request_type: str
    arguments: tuple
    idx: int = 0
    metadata: dict = field(default_factory=lambda: {"task": TASK, "doc_id": 0, "repeats": 1})

    @property
    def args(self) -> tuple:
        return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in doc["images"]]


@pytest.fixture(scope="module")
def adapter(checkpoint):
    ckpt, _, root = checkpoint
    paths = []
    for seed, size in ((1, (80, 60)), (2, (50, 90))):
        paths.append(str(root / f"lmms_img{seed}.png"))
        random_image(size, seed).save(paths[-1])
    lm = LlavaOVManagerJax(pretrained=ckpt, dtype="float32", batch_size="2", device="cuda:0")
    lm.task_dict = {TASK: {SPLIT: {0: {"images": paths[:1], "answer": "A cat"},
                                   1: {"images": paths, "answer": "Two"}}}}
    return lm


def test_generate_until(adapter):
    gen_kwargs = {"max_new_tokens": 4, "until": ["\n\n"], "temperature": 0, "do_sample": False}
    questions = [("What is in the image?", 0), ("Compare the images.", 1)]

    def requests(kwargs):
        return [Instance("generate_until", (q, dict(kwargs), doc_to_visual, d, TASK, SPLIT)) for q, d in questions]

    answers = adapter.generate_until(requests(gen_kwargs))
    tok, engine = adapter.tokenizer, adapter.engine
    prompts = []
    for (question, doc_id), image_tokens in zip(questions, (729, 2 * 729)):
        images = doc_to_visual(adapter.task_dict[TASK][SPLIT][doc_id])
        prompts.append(Prompt(build_eval_prompt(question, len(images), tok), images))
        assert engine.process(prompts[-1].ids, images, "p").num_image_tokens == image_tokens  # pad: 729 each
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=4))
    assert answers == [tok.decode(g.token_ids, skip_special_tokens=True).strip() for g in gens]
    # apply_until cuts answers at the first stop string (the original ignores `until`).
    assert len(answers[0]) >= 3
    stop = answers[0][1:3]
    cutting = LlavaOVManagerJax(engine=engine, tokenizer_obj=tok, apply_until=True, batch_size=2)
    cutting.task_dict = adapter.task_dict
    cut = cutting.generate_until(requests(dict(gen_kwargs, until=[stop])))
    assert cut[0] == answers[0].split(stop)[0].strip() and len(cut[0]) < len(answers[0])


def test_beam_search_requests_are_answered_with_a_warning(adapter, caplog):
    """num_beams > 1 (HF beam search in the original) is not implemented: the answer is the greedy
    one, and the log says so instead of reporting it as a beam-search result."""
    kwargs = {"max_new_tokens": 4, "until": ["\n\n"], "do_sample": False}
    request = lambda extra: [Instance("generate_until", ("What is in the image?", dict(kwargs, **extra),
                                                         doc_to_visual, 0, TASK, SPLIT))]
    with caplog.at_level("WARNING", logger="manager_jax.infer.lmms_adapter"):
        greedy = adapter.generate_until(request({}))
        # Only the adapter's records: JAX logs its compiles at WARNING under JAX_LOG_COMPILES=1.
        assert [r.getMessage() for r in caplog.records if r.name.startswith("manager_jax")] == []
        assert adapter.generate_until(request({"num_beams": 3})) == greedy
    assert "num_beams=3 is not supported: these requests are decoded greedily" in caplog.text


def test_sampling_defaults_come_from_the_generation_config_as_in_hf(adapter, checkpoint, tmp_path):
    """A sampling request without top_k / top_p: HF generate takes the checkpoint's
    generation_config.json values, else GenerationConfig's defaults; so does the adapter."""
    import shutil

    from transformers import GenerationConfig

    hf = GenerationConfig._get_default_generation_params()  # applied when neither the model nor the call sets them
    params, _ = adapter._sampling({"do_sample": True, "temperature": 1.0})
    assert (params.top_k, params.top_p) == (hf["top_k"], hf["top_p"])
    shutil.copytree(checkpoint[0], tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text('{"top_k": 1, "top_p": 0.5}')
    configured = LlavaOVManagerJax(pretrained=str(tmp_path / "ckpt"), dtype="float32", batch_size="2")
    configured.task_dict = adapter.task_dict
    params, _ = configured._sampling({"do_sample": True, "temperature": 1.0})
    assert (params.top_k, params.top_p) == (1, 0.5)
    # top_k 1 from the file: sampled answers are the greedy ones.
    kwargs = {"max_new_tokens": 4, "until": ["\n\n"]}
    requests = lambda extra: [Instance("generate_until", (q, dict(kwargs, **extra), doc_to_visual, d, TASK, SPLIT))
                              for q, d in (("What is in the image?", 0), ("Compare the images.", 1))]
    assert configured.generate_until(requests({"do_sample": True, "temperature": 1.0})) == \
        adapter.generate_until(requests({"do_sample": False}))


@pytest.mark.parametrize("request_kwargs", [
    {"do_sample": True},  # a task setting do_sample alone: HF samples at the file's / its default temperature
    {"do_sample": True, "temperature": 0.5, "top_k": 0},  # top_k 0 is HF's "off", not "default"
    {"do_sample": True, "temperature": 0.5, "top_p": None},  # the original's default top_p None: no top-p
    {"do_sample": False, "temperature": 0.2},  # mmvet's yaml: greedy
])
@pytest.mark.parametrize("file", [None, {"temperature": 0.7, "top_k": 20, "top_p": 0.8}])
def test_generation_kwargs_merge_as_hf_generate(checkpoint, tmp_path, request_kwargs, file):
    """temperature / top_k / top_p as HF generate merges the call's kwargs over the checkpoint's
    generation_config.json and its own defaults (transformers' `_prepare_generation_config` on a
    tiny model holding that file)."""
    import shutil

    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    shutil.copytree(checkpoint[0], tmp_path / "ckpt")
    if file is not None:
        (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps(file))
    lm = LlavaOVManagerJax(pretrained=str(tmp_path / "ckpt"), dtype="float32")
    hf_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=1, num_key_value_heads=1))
    hf_model.generation_config = GenerationConfig(**(file or {}))
    hf, _ = hf_model._prepare_generation_config(None, **request_kwargs)
    params, _ = lm._sampling(dict(request_kwargs, until=["\n\n"]))
    if not hf.do_sample:
        assert (params.temperature, params.top_k, params.top_p) == (0.0, 0, 1.0)
    else:  # the warpers HF adds (None or the neutral value: none)
        assert params.temperature == pytest.approx(hf.temperature)
        assert params.top_k == (hf.top_k or 0)
        assert params.top_p == pytest.approx(1.0 if hf.top_p is None else hf.top_p)


def test_generate_until_on_the_fused_decode_kernels(adapter, checkpoint):
    """lmms-eval's model_args pick the decode kernels (Pallas interpret mode here): same answers."""
    fused = LlavaOVManagerJax(pretrained=checkpoint[0], dtype="float32", batch_size="2", decode_attention="pallas",
                              decode_matmul="pallas")
    assert (fused.engine.decode_attention, fused.engine.decode_matmul) == ("pallas", "pallas")
    fused.task_dict = adapter.task_dict
    kwargs = {"max_new_tokens": 4, "until": ["\n\n"], "temperature": 0, "do_sample": False}
    requests = lambda: [Instance("generate_until", (q, dict(kwargs), doc_to_visual, d, TASK, SPLIT))
                        for q, d in (("What is in the image?", 0), ("Compare the images.", 1))]
    assert fused.generate_until(requests()) == adapter.generate_until(requests())


def test_loglikelihood(adapter):
    requests = [Instance("loglikelihood", ("What is it?", "A cat", doc_to_visual, 0, TASK, SPLIT)),
                Instance("loglikelihood",
                         ("How many?", lambda doc: doc["answer"] + "s", doc_to_visual, 0, TASK, SPLIT))]
    results = adapter.loglikelihood(requests)
    tok, engine = adapter.tokenizer, adapter.engine
    model = nnx.merge(engine.graphdef, engine.state)
    for (question, continuation, doc_id), (logprob, greedy) in zip(
            (("What is it?", "A cat", 0), ("How many?", "A cats", 0)), results):
        images = doc_to_visual(adapter.task_dict[TASK][SPLIT][doc_id])
        prompt = Prompt(build_eval_prompt(question, len(images), tok), images)
        cont = tok.encode(continuation)
        expected, expected_greedy = 0.0, True
        for i, token in enumerate(cont):
            logits = full_forward_logits(model, engine, prompt, cont[:i])[:LIMIT].astype(np.float64)
            shift = logits.max()
            expected += logits[token] - shift - np.log(np.exp(logits - shift).sum())
            expected_greedy &= int(np.argmax(logits)) == token
        assert isinstance(logprob, float) and isinstance(greedy, bool)
        assert abs(logprob - expected) < 1e-4
        assert greedy == expected_greedy


def test_default_tokenizer(adapter):
    assert adapter.tokenizer is load_tokenizer(None)


def test_generate_until_multi_round(adapter):
    """Rounds as the original adapter runs them: round 0 on the request, later rounds on what the
    task's doc_to_text returns, until it signals the end; its answer list is the result."""
    tok, engine = adapter.tokenizer, adapter.engine
    two_images = doc_to_visual(adapter.task_dict[TASK][SPLIT][1])
    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((doc["answer"], list(previous_output), round_idx, previous_round_info))
        if round_idx == 1:
            return two_images, f"You said {previous_output[-1]!r}. Compare.", False, previous_output, {"round": 1}
        return None, "", True, previous_output + ["(kept by the task)"], None

    gen_kwargs = {"max_new_tokens": 3, "until": ["\n\n"], "do_sample": False}
    request = Instance("generate_until_multi_round",
                       ("What is in the image?", gen_kwargs, doc_to_visual, doc_to_text, 0, TASK, SPLIT))
    [answers] = adapter.generate_until_multi_round([request])

    greedy = lambda question, images: tok.decode(engine.generate(
        [Prompt(build_eval_prompt(question, len(images), tok), images)], SamplingParams(max_new_tokens=3)
    )[0].token_ids, skip_special_tokens=True).strip()
    first = greedy("What is in the image?", doc_to_visual(adapter.task_dict[TASK][SPLIT][0]))
    second = greedy(f"You said {first!r}. Compare.", two_images)
    assert answers == [first, second, "(kept by the task)"]
    assert calls == [("A cat", [first], 1, None), ("A cat", [first, second], 2, {"round": 1})]


def test_multi_round_stops_at_max_rounds(adapter):
    endless = lambda doc, previous_output, round_idx, previous_round_info: (None, "Again?", False, previous_output, None)
    request = Instance("generate_until_multi_round",
                       ("Q", {"max_new_tokens": 1}, doc_to_visual, endless, 0, TASK, SPLIT))
    adapter.max_rounds = 2
    try:
        with pytest.raises(ValueError, match="no terminal signal after 2 rounds"):
            adapter.generate_until_multi_round([request])
    finally:
        adapter.max_rounds = 32


def test_unknown_model_args_are_refused(checkpoint):  # noqa: F811
    """Typos and the stray half of a mesh that lmms-eval split on ',' used to be swallowed."""
    from manager_jax.infer.engine import InputError

    ckpt, _, _ = checkpoint
    with pytest.raises(InputError, match="unknown model_args 'max_new_token'.*accepted: pretrained, tokenizer"):
        LlavaOVManagerJax(pretrained=ckpt, max_new_token="5")
    with pytest.raises(InputError, match="unknown model_args 'tensor'.*mesh=data:2/tensor:4"):
        LlavaOVManagerJax(pretrained=ckpt, mesh="data=2", tensor="4")
    with pytest.raises(InputError, match="batch_size must be a number.*got 'auto'"):  # lmms-eval's --batch_size auto
        LlavaOVManagerJax(pretrained=ckpt, batch_size="auto")


def test_one_of_several_processes_takes_its_slot_from_the_launcher(adapter, monkeypatch):
    """`torchrun` / `accelerate launch` set RANK, WORLD_SIZE and LOCAL_RANK; lmms-eval's evaluator
    splits the documents by `rank` and makes its gather tensors on `device`."""
    import torch

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    lm = LlavaOVManagerJax(engine=adapter.engine, tokenizer_obj=adapter.tokenizer)
    assert (lm.rank, lm.world_size) == (3, 4)
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # gloo's or NCCL's
    assert torch.tensor([5], device=lm.device).item() == 5
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK / WORLD_SIZE / LOCAL_RANK must be integers"):
        LlavaOVManagerJax(engine=adapter.engine, tokenizer_obj=adapter.tokenizer)


def test_one_of_several_processes_refuses_a_mesh_and_tpu_hosts(checkpoint, monkeypatch):  # noqa: F811
    """N processes with one device each, or one process with a mesh: not both (each process would
    claim every device). A TPU host's chips cannot be shared by several processes."""
    from manager_jax.infer import lmms_adapter
    from manager_jax.infer.engine import InputError

    ckpt, _, _ = checkpoint
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(InputError, match=r"mesh=data:2 in one of 2 processes \(WORLD_SIZE\): use either 2 "
                                         r"processes with one device each and no mesh, or run one process with "
                                         r"mesh=data:N"):
        LlavaOVManagerJax(pretrained=ckpt, mesh="data:2")
    monkeypatch.setattr(lmms_adapter, "_tpu_host", lambda: True)  # as on a TPU VM
    with pytest.raises(InputError, match="2 processes .* on a TPU host.*one process with mesh=data:N"):
        LlavaOVManagerJax(pretrained=ckpt)


def test_a_mesh_written_for_lmms_eval_model_args():
    """'pretrained=X,mesh=data:2/tensor:2' survives lmms-eval's parsing (split on ',' then on '=')
    and gives the same mesh as 'data=2,tensor=2'."""
    import jax

    from manager_jax.infer.loading import MeshSpecError, mesh_from_spec

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices; tests/conftest.py provides them on CPU")
    parsed = dict(arg.split("=") for arg in "pretrained=/ckpt,mesh=data:2/tensor:2,batch_size=2".split(","))
    assert parsed["mesh"] == "data:2/tensor:2"
    devices = jax.devices()[:4]
    mesh = mesh_from_spec(parsed["mesh"], devices)
    assert dict(mesh.shape) == dict(mesh_from_spec("data=2,tensor=2", devices).shape)
    assert dict(mesh.shape)["data"] == 2 and dict(mesh.shape)["tensor"] == 2
    for bad in ("data=1,data=2", "data:1/data:1", "tensor:2/fsdp=-1/tensor=1"):
        with pytest.raises(MeshSpecError, match="given twice"):
            mesh_from_spec(bad, devices)


def _mixed_requests(paths: list[str]) -> tuple[dict, list[Instance]]:
    """A generate_until list as lmms-eval hands it over when tasks mix settings: greedy and
    sampled, different max_new_tokens and stop strings, text-only, one and two images, with the
    same settings scattered over the list (lmms-eval's own adapter re-orders such a list)."""
    docs = {0: {"images": paths[:1]}, 1: {"images": paths}, 2: {"images": []}}
    greedy = lambda n, until: {"max_new_tokens": n, "until": until, "temperature": 0, "do_sample": False}
    sampled = {"max_new_tokens": 3, "until": ["\n\n"], "do_sample": True, "temperature": 0.7}
    spec = [("What is in the image?", greedy(3, ["\n\n"]), 0),
            ("Say something.", greedy(2, ["\n\n"]), 2),
            ("Describe it.", sampled, 0),
            ("Compare the images.", greedy(3, ["\n\n"]), 1),
            ("Answer briefly.", greedy(4, ["."]), 1),
            ("Hello there, how are you today?", greedy(3, ["\n\n"]), 2),
            ("And now?", sampled, 1),
            ("Which colour?", greedy(2, ["\n\n"]), 0),
            ("Count the shapes in both pictures, please.", greedy(3, ["\n\n"]), 0)]
    return docs, [Instance("generate_until", (q, dict(kw), doc_to_visual, d, TASK, SPLIT)) for q, kw, d in spec]


@pytest.fixture(scope="module")
def mixed_one_at_a_time(adapter):
    """The answers every batching of `_mixed_requests` must give, computed once for the batch sizes
    tested: (the list answered by a batch-1 adapter, {index: a greedy request answered alone},
    {index: a greedy request's answer computed here from the engine})."""
    tok, engine = adapter.tokenizer, adapter.engine
    docs, requests = _mixed_requests(adapter.task_dict[TASK][SPLIT][1]["images"])
    single = LlavaOVManagerJax(engine=engine, tokenizer_obj=tok, batch_size=1)
    single.task_dict = {TASK: {SPLIT: docs}}
    sequential, alone, direct = single.generate_until(requests), {}, {}
    for i, request in enumerate(requests):
        context, kwargs, _, doc_id, _, _ = request.args
        if kwargs["do_sample"]:
            continue
        alone[i] = single.generate_until([request])[0]
        images = doc_to_visual(docs[doc_id])
        [gen] = engine.generate([Prompt(build_eval_prompt(context, len(images), tok), images)],
                                SamplingParams(max_new_tokens=kwargs["max_new_tokens"]))
        direct[i] = tok.decode(gen.token_ids, skip_special_tokens=True).strip()
    return sequential, alone, direct


@pytest.mark.parametrize("batch_size", [1, 3])
def test_generate_until_mixed_requests_keep_their_order(adapter, mixed_one_at_a_time, batch_size):
    """Each answer lands at its request's place, whatever batch it was generated in: a greedy
    request's answer is the one a single-request call gives; a sampled one's does not depend on the
    batch size (each draws from its own stream). Batch size 1's answers are the fixture's list."""
    tok, engine = adapter.tokenizer, adapter.engine
    paths = adapter.task_dict[TASK][SPLIT][1]["images"]
    docs, requests = _mixed_requests(paths)
    sequential, alone, direct = mixed_one_at_a_time
    if batch_size == 1:
        answers = sequential
    else:
        lm = LlavaOVManagerJax(engine=engine, tokenizer_obj=tok, batch_size=batch_size)
        lm.task_dict = {TASK: {SPLIT: docs}}
        answers = lm.generate_until(requests)
        assert answers == sequential
    assert len(answers) == len(requests)
    greedy = [i for i, request in enumerate(requests) if not request.args[1]["do_sample"]]
    assert sorted(alone) == sorted(direct) == greedy and len(greedy) == 7
    for i in greedy:
        assert answers[i] == alone[i], requests[i].args[0]
        # Computed from the engine one by one: the order is the requests' own.
        assert answers[i] == direct[i], requests[i].args[0]


def test_sampled_request_draws_from_its_documents_stream(adapter):
    """A sampled request's answer depends on its document (and which copy of it), not on the other
    requests in the list, their order or how lmms-eval splits them over processes; copies of a
    request (lmms-eval's `repeats`) get independent samples."""
    tok, engine = adapter.tokenizer, adapter.engine
    paths = adapter.task_dict[TASK][SPLIT][1]["images"]
    docs, requests = _mixed_requests(paths)
    hot = {"max_new_tokens": 8, "until": ["\n\n"], "do_sample": True, "temperature": 1.5, "top_k": 0}
    for request in requests:
        if request.args[1]["do_sample"]:
            request.args[1].update(hot)
    lm = LlavaOVManagerJax(engine=engine, tokenizer_obj=tok, batch_size=2)
    lm.task_dict = {TASK: {SPLIT: docs}}
    answers = lm.generate_until(requests)
    sampled = [i for i, r in enumerate(requests) if r.args[1]["do_sample"]]
    assert len(sampled) == 2
    for i in sampled:
        assert lm.generate_until([requests[i]]) == [answers[i]]
    assert lm.generate_until(requests[::-1]) == answers[::-1]
    copies = lm.generate_until([requests[sampled[1]]] * 3)
    assert copies[0] == answers[sampled[1]] and len(set(copies)) == 3, copies


def test_loglikelihood_mixed_requests_keep_their_order(adapter):
    """Mixed contexts (text-only, one and two images, an empty continuation), scored batch_size
    at a time (a multiple-choice task's options share a forward pass): each result is the one a
    single-request call gives, at its request's place."""
    tok = adapter.tokenizer
    docs = {0: dict(adapter.task_dict[TASK][SPLIT][0]), 1: dict(adapter.task_dict[TASK][SPLIT][1]),
            2: {"images": [], "answer": "Yes"}}
    lm = LlavaOVManagerJax(engine=adapter.engine, tokenizer_obj=tok, batch_size=3)
    lm.task_dict = {TASK: {SPLIT: docs}}
    requests = [Instance("loglikelihood", (q, target, doc_to_visual, d, TASK, SPLIT)) for q, target, d in (
        ("What is it?", "A cat", 0), ("Is it day?", lambda doc: doc["answer"], 2), ("How many?", "Two of them", 1),
        ("Anything?", "", 0), ("What is it?", "A dog", 0), ("Tell me a longer story, please.", " Once", 2))]
    calls = []
    score = lm.engine.score
    lm.engine.score = lambda batch: calls.append(len(batch)) or score(batch)  # counts the real calls
    try:
        results = lm.loglikelihood(requests)
    finally:
        del lm.engine.score
    assert calls == [3, 2]  # batches of batch_size (the empty continuation is not scored)
    singles = [lm.loglikelihood([r])[0] for r in requests]
    for (logprob, greedy), (single, single_greedy) in zip(results, singles):
        # float32 sums over differently padded batches: equal to rounding
        assert logprob == pytest.approx(single, rel=1e-5) and greedy == single_greedy
    assert results[3] == (0.0, True)
    assert len({r[0] for r in results}) == len(results)  # distinct: a swapped result would show


def test_requests_too_long_for_max_length_are_skipped_and_counted(adapter, checkpoint, caplog):  # noqa: F811
    """With max_length 1,000 the two-image document (2 x 729 image tokens) does not fit: its
    requests are skipped with a warning and counted ("" and -inf), the others are answered as
    without the limit, and the evaluation goes on."""
    ckpt, _, _ = checkpoint
    short = LlavaOVManagerJax(pretrained=ckpt, dtype="float32", batch_size="3", max_length="1000")
    short.task_dict = adapter.task_dict
    kwargs = {"max_new_tokens": 4, "until": ["\n\n"], "do_sample": False}
    asks = [Instance("generate_until", (q, dict(kwargs), doc_to_visual, d, TASK, SPLIT))
            for q, d in (("What is in the image?", 0), ("Compare the images.", 1), ("Which colour?", 0))]
    scores = [Instance("loglikelihood", (q, t, doc_to_visual, d, TASK, SPLIT))
              for q, t, d in (("How many?", "Two", 1), ("What is it?", "A cat", 0))]
    with caplog.at_level("WARNING", logger="manager_jax.infer.lmms_adapter"):
        answers = short.generate_until(asks)
        results = short.loglikelihood(scores)
    assert answers[1] == "" and short.skipped.counts == {"too_long": 2}
    assert answers[0] == adapter.generate_until([asks[0]])[0] and answers[2] == adapter.generate_until([asks[2]])[0]
    assert results[0] == (float("-inf"), False) and results[1] == adapter.loglikelihood([scores[1]])[0]
    warnings = [r.getMessage() for r in caplog.records if " skipped (" in r.getMessage()]
    assert len(warnings) == 2 and all(f"request {TASK}/{SPLIT}/1 skipped (too_long; " in w for w in warnings)
    assert "2 skipped so far" in warnings[1]
    assert "too_long: 2" in caplog.records[-1].getMessage()  # the summary at the end of the call


def _greedy(engine, tok, ids: list[int], images: list, steps: int) -> str:
    [gen] = engine.generate([Prompt(ids, images)], SamplingParams(max_new_tokens=steps))
    return tok.decode(gen.token_ids, skip_special_tokens=True).strip()


def test_conversation_contexts_are_rendered_as_turns(adapter):
    """Tasks such as llava_interleave_bench give a conversation as a JSON list of {"from", "value"}
    turns; the original adapter (`utils.is_json(question)`) renders them as alternating user /
    assistant turns ending with an open assistant turn, not as one user message holding the JSON
    text. A context that is JSON but not a list is a plain question; a conversation with an even
    number of turns (the original asserts) is skipped and counted."""
    tok, engine = adapter.tokenizer, adapter.engine
    lm = LlavaOVManagerJax(engine=engine, tokenizer_obj=tok, batch_size=2)
    paths = adapter.task_dict[TASK][SPLIT][1]["images"]
    lm.task_dict = {TASK: {SPLIT: {0: {"images": paths[:1]}, 2: {"images": []}}}}
    with_image = json.dumps([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
                             {"from": "human", "value": "And its colour?"}])
    text_only = json.dumps([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""},
                            {"from": "human", "value": "Name a colour."}])
    even = json.dumps([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])
    kwargs = {"max_new_tokens": 6, "until": ["\n\n"], "do_sample": False}
    asks = [Instance("generate_until", (c, dict(kwargs), doc_to_visual, d, TASK, SPLIT))
            for c, d in ((with_image, 0), (text_only, 2), (even, 2), ("42", 2))]
    answers = lm.generate_until(asks)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    first = (system + "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
             "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\n")
    # An empty message renders as its role line alone (the original's `if message:`).
    second = (system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    image = doc_to_visual({"images": paths[:1]})
    assert answers[0] == _greedy(engine, tok, tokenizer_image_token(first, tok), image, 6)
    assert answers[1] == _greedy(engine, tok, tokenizer_image_token(second, tok), [], 6)
    assert answers[2] == "" and lm.skipped.counts == {"bad_conversation": 1}
    assert answers[3] == _greedy(engine, tok, build_eval_prompt("42", 0, tok), [], 6)


def _truncated_png(path) -> str:
    random_image((64, 48), 5).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def test_bad_visuals_are_skipped_and_counted(adapter, checkpoint, tmp_path, caplog, monkeypatch):  # noqa: F811
    """One bad request in a long evaluation is skipped with a warning and counted by reason (its
    answer "", its log-likelihood -inf), not an exception that ends the run: an unreadable image
    (raised by the task's doc_to_visual, as a dataset's lazy decoding does), a truncated file
    opened lazily, a video path, a zero-size image, "<image>" in a context without visuals or in a
    continuation.
    None entries of a visual list are no image (a text-only document). The other requests get the
    answers they get alone, in their places."""
    _, _, root = checkpoint
    # lmms-eval's task module sets PIL's LOAD_TRUNCATED_IMAGES (so there, as in the original's runs, a
    # truncated file decodes padded): PIL's default here, whichever test imported lmms-eval first.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    tok, engine = adapter.tokenizer, adapter.engine
    lm = LlavaOVManagerJax(engine=engine, tokenizer_obj=tok, batch_size=3)
    good, truncated = adapter.task_dict[TASK][SPLIT][0]["images"], _truncated_png(tmp_path / "cut.png")
    lm.task_dict = {TASK: {SPLIT: {0: {"images": good}, 1: {"images": [str(root / "broken.png")]},
                                   2: {"images": [truncated]}, 3: {"images": []}}}}
    lazy = lambda doc: [Image.open(p) for p in doc["images"]]  # decoded on first use
    kwargs = {"max_new_tokens": 3, "until": ["\n\n"], "do_sample": False}
    spec = [("What is in the image?", doc_to_visual, 0), ("And here?", doc_to_visual, 1),
            ("Truncated?", lazy, 2), ("A video.", lambda doc: ["clip.mp4"], 3),
            ("Nothing to see.", lambda doc: [None], 3), ("Tiny.", lambda doc: [Image.new("RGB", (0, 8))], 3),
            ("<image>\nWhere is it?", doc_to_visual, 3), ("Which colour?", doc_to_visual, 0)]
    asks = [Instance("generate_until", (q, dict(kwargs), v, d, TASK, SPLIT)) for q, v, d in spec]
    with caplog.at_level("WARNING", logger="manager_jax.infer.lmms_adapter"):
        answers = lm.generate_until(asks)
        # The last: "<image>" in a continuation (it ended the whole call with an InputError).
        scores = lm.loglikelihood([Instance("loglikelihood", ("What is it?", "A cat", v, d, TASK, SPLIT))
                                   for _, v, d in spec[:3]] +
                                  [Instance("loglikelihood", ("What is it?", "An <image>", doc_to_visual, 0, TASK,
                                                              SPLIT))])
    assert answers[1:4] == ["", "", ""] and answers[5:7] == ["", ""]
    image = doc_to_visual({"images": good})
    assert answers[0] == _greedy(engine, tok, build_eval_prompt(spec[0][0], 1, tok), image, 3)
    assert answers[7] == _greedy(engine, tok, build_eval_prompt(spec[7][0], 1, tok), image, 3)
    assert answers[4] == _greedy(engine, tok, build_eval_prompt(spec[4][0], 0, tok), [], 3)
    assert scores[1:] == [(float("-inf"), False)] * 3 and scores[0] == adapter.loglikelihood(
        [Instance("loglikelihood", ("What is it?", "A cat", doc_to_visual, 0, TASK, SPLIT))])[0]
    assert lm.skipped.counts == {"unreadable_image": 2, "truncated_image": 2, "video_unsupported": 1,
                                 "zero_size_image": 1, "image_count_mismatch": 2}
    text = caplog.text
    assert f"request {TASK}/{SPLIT}/1 skipped (unreadable_image; " in text and "broken.png" in text
    assert f"request {TASK}/{SPLIT}/3 skipped (video_unsupported; " in text and "'clip.mp4'" in text
