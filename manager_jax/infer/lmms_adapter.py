"""lmms-eval model adapter: `generate_until` and `loglikelihood` on our JAX engine.

It mirrors the original evaluation adapter (`lmms-eval/lmms_eval/models/llava_onevision.py`,
SPEC §7.2): qwen_1_5 prompts with one "<image>" per visual prepended when the context has none,
pad mode for more than one image, greedy decoding with max_new_tokens 1024 by default, answers
decoded without special tokens and stripped, generation stopped on the checkpoint's eos ids.

Differences from the original, on purpose:
- `loglikelihood` returns the **sum of the log-probabilities of the continuation's tokens** (what
  lmms-eval's API asks for), not the original's mean cross-entropy over the continuation plus the
  closing "<|im_end|>\\n"; `is_greedy` is computed on aligned positions (the original compares
  slices taken at unexpanded positions of the expanded logits).
- Requests with identical generation kwargs are batched (`batch_size`, left-padded; outputs are
  the same as one by one), and so are consecutive log-likelihood requests (equal to rounding).
  The original requires batch size 1.
- `until` is ignored by default, as in the original (it pops it); `apply_until=True` cuts answers
  at the first stop string, as lmms-eval's API describes.
- The checkpoint's generation_config.json repetition_penalty, if any, applies to the generated
  ids only (the original passes the prompt as embeddings, so HF penalises only generated ids).
  When a request samples (`do_sample`) without temperature / top_p / top_k, they come from that
  file too, else from HF's defaults (temperature 1, top_k 50), as HF generate does (do_sample with
  temperature 0, which HF refuses, decodes greedily); `num_beams` > 1 is not supported (a warning).
- A context that is a JSON list of {"value": ...} turns (lmms-eval's conversational tasks, e.g.
  llava_interleave_bench) is rendered as alternating user / assistant turns, as the original's
  `utils.is_json` branch does, when no "<image>" prefix is due; other JSON (a bare number) is a
  plain question (the original fails on it).
- A request that cannot be answered is skipped with a warning and counted by reason in `skipped`
  (a `SkipCounter`; a summary is logged at the end of each call): its answer is "" and its
  log-likelihood -inf, and the evaluation goes on. Reasons: a prompt that does not fit `max_length`
  (the model's maximum position unless given; HF runs past the trained positions), an image that
  cannot be decoded or has no pixels, a video (lmms-eval passes videos as paths) or another
  non-image visual, "<image>" placeholders that do not match the visuals (or one in a
  log-likelihood continuation), a JSON conversation with
  an even number of turns. The original raises on each of them (or runs on, past its positions),
  ending a run of hours on one document. None entries of a visual list are no image.
- `generate_until_multi_round` follows the original's round protocol (the task's `doc_to_text`
  gives each next round's visuals and context and says when to stop), one request at a time, with
  a round limit (`max_rounds`) instead of looping for ever on a task that never says stop.

Data parallelism: as the original (`accelerate launch --num_processes N -m lmms_eval ...`), the
adapter runs as one of N processes started by `accelerate launch` or `torchrun` (WORLD_SIZE > 1):
lmms-eval splits the documents by RANK and gathers the results. Each process then keeps JAX to
its own GPU (number LOCAL_RANK), else every process would take memory on every GPU of the host;
`device` is where lmms-eval puts its small gather tensors. TPU chips cannot be shared by several
processes of a host, and a mesh in such a process is refused: one process with mesh=data:N is the
other way (README.md).

lmms-eval itself is imported lazily: it is not a dependency (0.7.3 pulls torchvision, wandb,
datasets, sentence-transformers and more; README.md says what its test needs). When it is
importable, `LlavaOVManagerJax` subclasses its `lmms` base class; register it with the entry
point `[project.entry-points."lmms_eval.models"] llava_ov_manager_jax =
"manager_jax.infer.lmms_adapter:lmms_eval_manifest"` or by calling `register()`. The adapter only
uses the request attributes `args` (= `arguments`) and the evaluator's `task_dict`, so it runs
with any object that has them (the tests use a stand-in `Instance`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from PIL import Image

from manager_jax.data.conversation import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from manager_jax.data.samples import (
    BAD_RECORD,
    IMAGE_COUNT_MISMATCH,
    TOO_LONG,
    VIDEO_UNSUPPORTED,
    SkipCounter,
    SkipSample,
    decode_image,
    image_errors,
)
from manager_jax.infer.engine import InferenceEngine, InputError, Prompt, PromptTooLongError, ScoreRequest
from manager_jax.infer.loading import (
    default_vocab_limit,
    load_model,
    mesh_from_spec,
    read_eos_ids,
    read_repetition_penalty,
    read_sampling_defaults,
)
from manager_jax.infer.requests import generation_prompt, score_request
from manager_jax.infer.sampling import SamplingParams
from manager_jax.platform import use_compilation_cache

logger = logging.getLogger(__name__)
SAMPLING_OFF = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # the values of a warper HF does not add

MODEL_NAME = "llava_ov_manager_jax"
BAD_CONVERSATION = "bad_conversation"  # a skip reason (module docstring)
DEFAULT_MAX_NEW_TOKENS = 1024  # the original adapter's default


def _lmms_base() -> type:
    try:
        from lmms_eval.api.model import lmms
    except ImportError:  # lmms-eval not installed: a plain class with the same methods
        return object
    return lmms


_Base = _lmms_base()


# What lmms-eval itself adds to --model_args (create_from_arg_string's extra config): JAX places the
# model itself, so they are ignored. Anything else unknown is an error.
LMMS_EVAL_EXTRAS = frozenset({"device", "max_batch_size", "device_map"})


def launch_slot(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) of this process, as `torchrun` / `accelerate launch` set them
    and lmms-eval's evaluator reads them; (0, 1, 0) for a single process."""
    env = os.environ if env is None else env
    try:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    except ValueError as err:
        raise InputError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None


def _tpu_host() -> bool:
    """Whether this host has TPU chips, found without starting a JAX backend."""
    try:  # private: the PCI scan JAX itself uses
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, TypeError, IndexError):  # another jax: ask the backend
        import jax

        return jax.default_backend() == "tpu"


def keep_to_own_device(world_size: int, local_rank: int, mesh: str | None) -> None:
    """Before the JAX backend starts, in one of `world_size` > 1 data-parallel processes: refuse
    what cannot work, and show JAX only this process's GPU (LOCAL_RANK)."""
    import jax
    from jax._src import xla_bridge

    one_process = "or run one process with mesh=data:N over the host's devices"
    if mesh:
        raise InputError(f"mesh={mesh} in one of {world_size} processes (WORLD_SIZE): use either "
                         f"{world_size} processes with one device each and no mesh, {one_process}")
    if _tpu_host():
        raise InputError(f"{world_size} processes (WORLD_SIZE) on a TPU host: its chips cannot be shared by "
                         f"several processes; launch lmms-eval as one process with mesh=data:N instead")
    if xla_bridge.backends_are_initialized():  # too late to choose: fine only if it sees one GPU
        gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
        if len(gpus) > 1:
            raise InputError(f"JAX started before the adapter with {len(gpus)} GPUs in each of {world_size} "
                             "processes: set CUDA_VISIBLE_DEVICES per process, or build the adapter first")
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if len(visible) == 1 and visible[0].strip():  # the launcher gave this process one GPU already
        return
    for option in ("jax_cuda_visible_devices", "jax_rocm_visible_devices"):
        jax.config.update(option, str(local_rank))


def _given(value: Any, default: Any) -> Any:
    """`value`, or `default` when it is None (not given, as HF generate reads its kwargs)."""
    return default if value is None else value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


class LlavaOVManagerJax(_Base):  # type: ignore[misc, valid-type]
    """lmms-eval model `llava_ov_manager_jax`.

    Args (lmms-eval `--model_args`, strings accepted):
      pretrained: our params directory (or training checkpoint).
      tokenizer: local HF tokenizer directory (default: the checkpoint's tokenizer/ if present, else
        the offline Qwen2 tokenizer).
      dtype: compute dtype ("float16" as the original evaluation; "float32" / "bfloat16").
      batch_size: requests per generation batch.
      apply_until: cut answers at lmms-eval's `until` strings (the original ignores them).
      vocab_limit: ids >= this are excluded (default: len(tokenizer) without <image>/<video>,
        as the original's `resize_token_embeddings(len(tokenizer))`; -1 = whole vocabulary).
      max_length: longest prompt + answer (default: the model's maximum).
      mesh: shard over the local devices, e.g. "fsdp:-1" or "data:2/tensor:4" (default: one device).
        Write it without "," and "=" on an lmms-eval command line, which splits --model_args on
        them; "data=2,tensor=4" works from Python. Refused in one of several processes (WORLD_SIZE > 1).
      max_rounds: most rounds of one multi-round request (`generate_until_multi_round`).
      decode_attention / decode_matmul: the decode steps' attention and projections, as
        `InferenceEngine` takes them ("auto" / "xla" / "pallas"; "xla" / "pallas"); speed only.
      engine: an existing `InferenceEngine` (then `pretrained` is not loaded) with `tokenizer_obj`.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "float16",
        batch_size: int | str = 1,
        apply_until: bool | str = False,
        vocab_limit: int | str | None = None,
        max_length: int | str | None = None,
        mesh: str | None = None,
        max_rounds: int | str = 32,
        decode_attention: str = "auto",
        decode_matmul: str = "xla",
        engine: InferenceEngine | None = None,
        tokenizer_obj: Any = None,
        **unused: Any,
    ) -> None:
        unknown = sorted(set(unused) - LMMS_EVAL_EXTRAS)
        if unknown:  # a typo (max_new_token=5) or a mesh split by lmms-eval (mesh=data=2,tensor=4)
            accepted = [name for name in inspect.signature(type(self).__init__).parameters
                        if name not in ("self", "engine", "tokenizer_obj", "unused")]
            raise InputError(
                f"unknown model_args {', '.join(map(repr, unknown))} for {MODEL_NAME}; accepted: "
                f"{', '.join(accepted)} (write a mesh of several axes as mesh=data:2/tensor:4)")
        if not str(batch_size).strip().isdigit():  # lmms-eval's --batch_size auto
            raise InputError(f"batch_size must be a number of prompts generated together, got {batch_size!r} "
                             "(16 is a good start on one GPU)")
        if _Base is not object:
            super().__init__()
        else:
            self.task_dict: dict = {}
        self._rank, self._world_size, self.local_rank = launch_slot()
        if self._world_size > 1 and engine is None:
            keep_to_own_device(self._world_size, self.local_rank, mesh)
        from manager_jax.data.tokenizer import load_tokenizer

        if tokenizer is None and pretrained and os.path.isdir(os.path.join(pretrained, "tokenizer")):
            tokenizer = os.path.join(pretrained, "tokenizer")  # the converter bundles the checkpoint's
        self.tokenizer = tokenizer_obj if tokenizer_obj is not None else load_tokenizer(tokenizer)
        if engine is None:
            if not pretrained:
                raise InputError("pass pretrained=<params directory> (or an engine)")
            use_compilation_cache()  # as run.py: a second evaluation loads the programs of the first
            device_mesh = mesh_from_spec(mesh)
            model = load_model(pretrained, dtype=dtype, mesh=device_mesh)
            vocab = model.cfg.text.vocab_size
            if vocab_limit is None:
                limit = default_vocab_limit(self.tokenizer, vocab)
            else:
                limit = vocab if int(vocab_limit) < 0 else min(int(vocab_limit), vocab)
            engine = InferenceEngine(
                model, eos_ids=read_eos_ids(pretrained, self.tokenizer.eos_ids), pad_id=self.tokenizer.pad_id,
                im_start_id=self.tokenizer.im_start_id, vocab_limit=limit,
                max_length=int(max_length) if max_length is not None else None, mesh=device_mesh,
                decode_attention=decode_attention, decode_matmul=decode_matmul,
            )
        self.engine = engine
        # HF merges the checkpoint's generation_config into greedy generation too (SPEC §7.2 step 10).
        self.repetition_penalty = read_repetition_penalty(pretrained) if pretrained else 1.0
        # What HF generate samples with for a knob the request does not give (the original gives no
        # top_k; a task may set do_sample alone): generation_config.json's value, else HF's default.
        self.sampling_defaults = read_sampling_defaults(pretrained)
        self.batch_size_per_gpu = max(int(batch_size), 1)
        self.apply_until = _as_bool(apply_until)
        self.max_rounds = int(max_rounds)
        self.skipped = SkipCounter()  # requests that cannot be answered, by reason (module docstring)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self):
        """The torch device lmms-eval's evaluator makes its gather tensors on (NCCL needs this
        process's GPU when torch has CUDA); the model itself runs in JAX."""
        import torch

        if not torch.cuda.is_available():
            return torch.device("cpu")
        # A launcher that set CUDA_VISIBLE_DEVICES per process leaves it one GPU, number 0.
        return torch.device("cuda", self.local_rank if torch.cuda.device_count() > 1 else 0)

    # ---- helpers ---------------------------------------------------------------------------
    def _visuals(self, load_visuals, where: str) -> list[Image.Image]:
        # A dataset decodes its images when the task's doc_to_visual reads them: errors come from there too.
        with image_errors("the task's visuals", where):
            visuals = load_visuals()
        return _images(visuals, where)

    def _doc_visuals(self, doc_to_visual, task: str, split: str, doc_id):
        """A loader of a document's visuals, for `_prompt` / `_visuals`."""
        return lambda: doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None

    def _prompt(self, context: str, load_visuals, where: str) -> Prompt | None:
        """The generation prompt of a request, or None when it is skipped (`_skip`)."""
        try:
            images = self._visuals(load_visuals, where)
            prompt = generation_prompt(lmms_question(context, len(images), where), images, self.tokenizer)
            _check_placeholders(prompt.ids, len(images), where)
            try:  # room to answer below max_length
                self.engine.check_prompt(prompt.ids, [image.size for image in images], where)
            except PromptTooLongError as err:
                raise SkipSample(TOO_LONG, where, str(err)) from None
        except SkipSample as skip:
            self._skip(skip)
            return None
        return prompt

    def _skip(self, skip: SkipSample) -> None:
        self.skipped.add(skip)
        logger.warning("request %s skipped (%s; %d skipped so far): %s", skip.record_id, skip.reason,
                       self.skipped.total, skip.detail)

    def _summary(self, skipped_before: int) -> None:
        """At the end of a call that skipped requests: the counts so far, by reason."""
        if self.skipped.total > skipped_before:
            self.skipped.log_summary(logger)

    def _answers(self, prompts: list, params: SamplingParams, until: list[str], streams: Sequence[int]) -> list[str]:
        """Decoded, stripped answers to prompts generated as one batch (`streams`: each prompt's
        random stream, InferenceEngine.generate)."""
        answers = []
        for gen in self.engine.generate(prompts, params, streams=streams):
            text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
            if self.apply_until:
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    def _sampling(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        """lmms-eval generation kwargs -> sampling params and stop strings (SPEC §7.2 step 5)."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        do_sample = _as_bool(kwargs.get("do_sample", False))
        beams = int(kwargs.get("num_beams") or 1)
        if beams > 1:  # the original passes it to HF generate; a silent greedy answer would misreport the task
            logger.warning("num_beams=%d is not supported: these requests are decoded %s, one beam", beams,
                           "by sampling" if do_sample else "greedily")
        # As HF generate merges its kwargs: a value the request gives wins, even 0 (top_k 0 is off)
        # or None (no warper: the original's default top_p None); absent ones are the defaults.
        sampling = {name: _given(kwargs[name] if name in kwargs else default, SAMPLING_OFF[name])
                    for name, default in self.sampling_defaults.items()}
        # temperature 0 with do_sample: HF refuses it; lmms-eval's convention reads it as greedy.
        temperature = float(sampling["temperature"]) if do_sample else 0.0
        params = SamplingParams(
            max_new_tokens=int(_given(kwargs.get("max_new_tokens"), DEFAULT_MAX_NEW_TOKENS)),
            temperature=temperature,
            top_p=float(sampling["top_p"]) if temperature else 1.0,
            top_k=int(sampling["top_k"]) if temperature else 0,
            repetition_penalty=float(_given(kwargs.get("repetition_penalty"), self.repetition_penalty)),
        )
        return params, until

    # ---- lmms-eval API ---------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request; request.args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        results: list[str | None] = [None] * len(requests)
        skipped_before = self.skipped.total
        groups: dict[str, list[int]] = {}
        streams, copies = [], Counter()
        for index, request in enumerate(requests):
            context, gen_kwargs, _, doc_id, task, split = request.args
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
            same = (task, split, doc_id, context, key)  # lmms-eval repeats a request for `repeats`
            streams.append(request_stream(task, split, doc_id, context, copies[same]))
            copies[same] += 1
        for indices in groups.values():
            params, until = self._sampling(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                prompts, kept = [], []
                for index in indices[start : start + self.batch_size]:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    prompt = self._prompt(context, self._doc_visuals(doc_to_visual, task, split, doc_id),
                                          f"{task}/{split}/{doc_id}")
                    if prompt is not None:  # else its answer stays ""
                        prompts.append(prompt)
                        kept.append(index)
                if not prompts:
                    continue
                # Each request samples from the stream of its document, whatever the batch size, the
                # other requests, and how lmms-eval splits them over processes.
                chunk_streams = [streams[index] for index in kept]
                for index, answer in zip(kept, self._answers(prompts, params, until, chunk_streams)):
                    results[index] = answer
        self._summary(skipped_before)
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation's tokens, is greedy) per request;
        request.args = (context, doc_to_target, doc_to_visual, doc_id, task, split).
        Scored `batch_size` requests per forward pass (a multiple-choice task's options are
        consecutive requests); images are read one batch at a time."""
        results: list[tuple[float, bool]] = []
        skipped_before = self.skipped.total
        for start in range(0, len(requests), self.batch_size):
            known: list[tuple[float, bool] | None] = []  # None: the next result of `batch`
            batch = []
            for request in requests[start : start + self.batch_size]:
                try:
                    where, score = self._score_request(request)
                except SkipSample as skip:  # no option is chosen for it
                    self._skip(skip)
                    known.append((float("-inf"), False))
                    continue
                known.append((0.0, True) if score is None else None)  # nothing to score: log 1
                if score is not None:
                    batch.append((where, score))
            scored = iter(self._scores(batch))
            results += [result if result is not None else next(scored) for result in known]
        self._summary(skipped_before)
        return results

    def _score_request(self, request) -> tuple[str, ScoreRequest | None]:
        """(where, what to score; None for an empty continuation), or SkipSample."""
        context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
        where = f"{task}/{split}/{doc_id}"
        continuation = (doc_to_target if isinstance(doc_to_target, str)
                        else doc_to_target(self.task_dict[task][split][doc_id]))
        images = self._visuals(self._doc_visuals(doc_to_visual, task, split, doc_id), where)
        try:
            score = score_request(context, continuation, images, self.tokenizer)
        except InputError as err:  # an "<image>" in the continuation
            raise SkipSample(IMAGE_COUNT_MISMATCH, where, str(err)) from None
        if score is not None:
            _check_placeholders(score.ids, len(images), where)
        return where, score

    def _scores(self, batch: list[tuple[str, ScoreRequest]]) -> list[tuple[float, bool]]:
        """Results of one forward pass over `batch`; if a request is too long for max_length, the
        batch is scored one by one and that request skipped."""
        if not batch:
            return []
        try:
            return [(r.logprob, r.is_greedy) for r in self.engine.score([score for _, score in batch])]
        except PromptTooLongError as err:
            if len(batch) > 1:
                return [result for item in batch for result in self._scores([item])]
            self._skip(SkipSample(TOO_LONG, batch[0][0], str(err)))
            return [(float("-inf"), False)]

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
        """Every round's answer per request, as the original adapter runs lmms-eval's multi-round
        tasks. request.args = (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split).

        Round 0 answers the request's context and visuals. Before each later round the task's
        ``doc_to_text(doc, previous_output=answers so far, round_idx=r, previous_round_info=info)``
        returns (visuals, context, terminal, answers, info): the next round's inputs, whether to
        stop, and the answers as the task keeps them (they replace ours, as in the original).
        Each result is a list, one answer per round: lmms-eval 0.7.3 passes a list of strings to the
        task and turns anything else (the original's tuple) into one string.
        """
        results = []
        skipped_before = self.skipped.total
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            where = f"{task}/{split}/{doc_id}"
            params, until = self._sampling(gen_kwargs)
            doc = self.task_dict[task][split][doc_id]
            load_visuals = self._doc_visuals(doc_to_visual, task, split, doc_id)
            answers: list[str] = []
            info = None
            for round_idx in range(self.max_rounds + 1):
                if round_idx:
                    visuals, context, terminal, answers, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                    )
                    answers = list(answers)
                    if terminal:
                        break
                    if round_idx == self.max_rounds:
                        raise InputError(f"{where}: no terminal signal after {self.max_rounds} rounds "
                                         "(raise max_rounds if the task needs more)")
                    load_visuals = lambda visuals=visuals: visuals
                prompt = self._prompt(context, load_visuals, f"{where} round {round_idx}")
                if prompt is None:
                    answers.append("")  # skipped (counted); later rounds build on this one
                    break
                stream = request_stream(task, split, doc_id, context, 0)
                answers.append(self._answers([prompt], params, until, [stream])[0])
            results.append(list(answers))
        self._summary(skipped_before)
        return results


def request_stream(task: str, split: str, doc_id: Any, context: str, copy: int) -> int:
    """The random stream of a sampled request: a hash of its document (task, split, doc_id), its
    context and which copy of the same request this is, in [0, 2**31)."""
    name = json.dumps([task, split, doc_id, context, copy], default=str)
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _images(visuals: Any, where: str) -> list[Image.Image]:
    """A task's visuals (None, one image or a list of them; None entries are no image) as decoded
    PIL images; SkipSample for anything else (a path: how lmms-eval passes videos) or a bad image."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = []
    for i, v in enumerate(v for v in visuals if v is not None):
        if isinstance(v, str):
            raise SkipSample(VIDEO_UNSUPPORTED, where, f"visual {v!r:.120} is a path, as lmms-eval passes "
                                                       "videos: only PIL images are supported")
        if not isinstance(v, Image.Image):
            raise SkipSample(BAD_RECORD, where, f"visual {i} is a {type(v).__name__}, not a PIL image")
        images.append(decode_image(v, getattr(v, "filename", "") or f"visual {i}", where))
    return images


def _check_placeholders(ids: Sequence[int], n_images: int, where: str) -> None:
    found = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    if found != n_images:
        raise SkipSample(IMAGE_COUNT_MISMATCH, where, f"the prompt has {found} {DEFAULT_IMAGE_TOKEN!r} for "
                                                      f"{n_images} visuals")


def lmms_question(context: str, n_images: int, where: str) -> str | list[str]:
    """The original adapter's reading of a context (`utils.is_json`): a JSON list of {"value": str}
    turns is a conversation (its values, alternately user and assistant) when no "<image>" prefix
    is due (it would make the text no longer JSON); anything else is the question itself."""
    if n_images and DEFAULT_IMAGE_TOKEN not in context:
        return context
    try:
        turns = json.loads(context)
    except ValueError:
        return context
    if not isinstance(turns, list):  # a bare number or string: the original fails on it
        return context
    values = [turn.get("value") if isinstance(turn, dict) else None for turn in turns]
    if len(values) % 2 != 1 or not all(isinstance(v, str) for v in values):
        raise SkipSample(BAD_CONVERSATION, where, "a JSON conversation needs an odd number of {\"value\": str} "
                                                  f"turns, user first and last; got {context!r:.160}")
    return values


def lmms_eval_manifest():
    """Entry-point payload for lmms-eval >= 0.7 (`lmms_eval.models` group)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LlavaOVManagerJax")


def register() -> None:
    """Registers the adapter in lmms-eval's decorator registry (older lmms-eval versions)."""
    from lmms_eval.api.registry import register_model

    register_model(MODEL_NAME)(LlavaOVManagerJax)
