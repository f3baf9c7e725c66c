"""The adapter inside the real lmms-eval package, when it is importable (CI does not install it).

Registered as lmms-eval registers plugins (a `ModelManifest`, as the entry point gives it), built
by lmms-eval's own `create_from_arg_string` with the extras its evaluator adds, and fed lmms-eval's
own `Instance` objects. Expected answers: the same requests through the stand-in of
tests/test_infer_lmms_adapter.py, which that file checks against the model.
"""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval.models.registry_v2")

from lmms_eval import models as lmms_models  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402

from manager_jax.infer.lmms_adapter import MODEL_NAME, LlavaOVManagerJax, lmms_eval_manifest  # noqa: E402
from tests.test_infer_cli import checkpoint  # noqa: E402, F401 (a shared fixture)
from tests.test_infer_lmms_adapter import SPLIT, TASK, adapter, doc_to_visual
from tests.test_infer_lmms_adapter import Instance as StandIn  # noqa: E402, F401


def test_registered_built_and_run_by_lmms_eval(checkpoint, adapter):  # noqa: F811
    lmms_models.MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)
    cls = lmms_models.get_model(MODEL_NAME)
    assert cls is LlavaOVManagerJax and issubclass(cls, lmms)
    ckpt, _, _ = checkpoint
    # What `lmms_eval --model llava_ov_manager_jax --model_args ... --batch_size 2` does.
    lm = cls.create_from_arg_string(f"pretrained={ckpt},dtype=float32",
                                    {"batch_size": 2, "max_batch_size": None, "device": "cuda:0"})
    lm.task_dict = adapter.task_dict
    meta = {"task": TASK, "doc_id": 0, "repeats": 1}
    kwargs = {"max_new_tokens": 3, "until": ["\n\n"], "temperature": 0, "do_sample": False}
    gen = [(q, dict(kwargs), doc_to_visual, d, TASK, SPLIT) for q, d in (("What is in it?", 0), ("Compare.", 1))]
    ll = [("What is it?", "A cat", doc_to_visual, 0, TASK, SPLIT)]
    real = lambda kind, args: [Instance(kind, a, idx=i, metadata=meta) for i, a in enumerate(args)]
    stand_in = lambda kind, args: [StandIn(kind, a) for a in args]
    assert lm.generate_until(real("generate_until", gen)) == adapter.generate_until(stand_in("generate_until", gen))
    assert lm.loglikelihood(real("loglikelihood", ll)) == adapter.loglikelihood(stand_in("loglikelihood", ll))
    assert (lm.rank, lm.world_size) == (0, 1)


def test_multi_round_answers_reach_the_task_one_per_round(adapter):
    """lmms-eval 0.7.3's evaluator hands a multi-round output to the task through
    `unwrap_generation_output`, which keeps a list of strings (one per round) and turns anything
    else, a tuple included, into one string."""
    from lmms_eval.api.instance import unwrap_generation_output

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        if round_idx == 1:
            return None, "And now?", False, previous_output, None
        return None, "", True, previous_output, None

    meta = {"task": TASK, "doc_id": 0, "repeats": 1}
    request = Instance("generate_until_multi_round", ("What is in it?", {"max_new_tokens": 2, "do_sample": False},
                                                      doc_to_visual, doc_to_text, 0, TASK, SPLIT), idx=0, metadata=meta)
    [output] = adapter.generate_until_multi_round([request])
    rounds, _ = unwrap_generation_output(output)
    assert isinstance(rounds, list) and len(rounds) == 2 and all(isinstance(r, str) for r in rounds)
    assert rounds == list(output)
