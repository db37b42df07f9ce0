"""The lmms-eval plugin with lmms-eval's real model API (installed without its task-suite dependencies in CI)."""

import pytest

lmms_eval = pytest.importorskip("lmms_eval.api.model")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from vidsparse.models.random import build_random_qwen2_5_vl

    return build_random_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny")


def test_entry_point_registers_the_model():
    from importlib.metadata import entry_points

    from lmms_eval.models.registry_v2 import ModelRegistryV2

    assert "vidsparse" in {ep.name for ep in entry_points(group="lmms_eval.models")}
    reg = ModelRegistryV2()
    reg.load_entrypoint_manifests()
    m = reg.get_manifest("vidsparse")
    assert m.simple_class_path == "vidsparse.eval.lmms.models.vidsparse.VidsparseLMM"
    from vidsparse.eval.lmms.models import AVAILABLE_MODELS

    assert AVAILABLE_MODELS == {"vidsparse": "VidsparseLMM"}  # the LMMS_EVAL_PLUGINS hook


def test_generate_until_answers_video_requests(tiny_qwen, synth):
    from lmms_eval.api.instance import Instance

    from vidsparse.eval.lmms.models.vidsparse import VidsparseLMM

    lm = VidsparseLMM.create_from_arg_string(f"model={tiny_qwen},budget=4,tokens=evs,visual_tokens=24,device=cpu,"
                                             "max_new_tokens=3", {"batch_size": 1})
    lm.task_dict = {"videomme": {"test": {7: {"video": synth[0]}}}}
    reqs = [Instance("generate_until", (f"Question {i}? Answer with the letter.", {"until": ["\n\n"]},
                                        lambda doc: [doc["video"]], 7, "videomme", "test"), i,
                     {"task": "videomme", "doc_id": 7, "repeats": 1}) for i in range(2)]
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert [s["visual_tokens"] for s in lm.stats] == [24, 24] and lm.stats[0]["frames"] == 4
    assert lm.recipe.tokens == "evs" and lm.recipe.budget.tokens == 24


def test_bad_requests_are_clear(tiny_qwen):
    from vidsparse.errors import InputError
    from vidsparse.eval.lmms.models.vidsparse import VidsparseLMM, _visual_path

    with pytest.raises(InputError, match="one video file"):
        _visual_path([{"bytes": b""}])
    with pytest.raises(InputError, match="model="):
        VidsparseLMM()
