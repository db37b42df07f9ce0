"""lmms-eval plugin: run any vidsparse recipe inside lmms-eval's task suite.

    pip install lmms-eval                     # lmms-eval itself (and the datasets its tasks download)
    python -m lmms_eval --model vidsparse \\
        --model_args model=/models/Qwen2.5-VL-7B-Instruct,recipe=recipes/aot8k.yaml,max_new_tokens=16 \\
        --tasks videomme --batch_size 1

lmms-eval ≥ 0.7 finds the model through the ``lmms_eval.models`` entry point vidsparse declares; older releases need
``LMMS_EVAL_PLUGINS=vidsparse.eval.lmms`` in the environment (this package then serves ``models.AVAILABLE_MODELS``).
``model_args`` are split at commas by lmms-eval, so method specs with several parameters go in a recipe file; single-
parameter specs may be given inline (``tokens=aot``, ``attention=block_topk``, ``budget=64``, ``visual_tokens=8192``).
"""
