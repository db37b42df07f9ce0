"""What lmms-eval reads: ``AVAILABLE_MODELS`` (the ``LMMS_EVAL_PLUGINS`` hook) and ``manifest`` (the
``lmms_eval.models`` entry point)."""

AVAILABLE_MODELS = {"vidsparse": "VidsparseLMM"}


def manifest():
    """lmms-eval ≥ 0.7 entry-point payload: the model id and the class path lmms-eval imports lazily."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vidsparse", simple_class_path="vidsparse.eval.lmms.models.vidsparse.VidsparseLMM")
