"""``vidsparse serve``: the model loaded once, questions and moment searches over HTTP, and a small page.

    vidsparse serve --model /models/Qwen2.5-VL-7B-Instruct --recipe recipes/aot8k.yaml --port 8000

Endpoints (JSON):
- ``GET /health``: model type, device, default recipe.
- ``GET /methods``: registered method names per stage.
- ``POST /ask`` ``{"video": PATH, "question": TEXT, "recipe": {...}?, "max_new_tokens": N?}`` →
  ``{"answer", "stats", "recipe"}``; the recipe overrides the server's default stage by stage.
- ``POST /moments`` ``{"video": PATH, "query": TEXT?, "budget": N?, "frames": SPEC?, "scorer": SPEC?}`` → the
  ``vidsparse select --json`` document (no model needed).
- ``POST /upload`` (multipart ``file``) → ``{"video": PATH}`` under the server's upload directory.
- ``GET /``: a page with a form for ``/ask`` and ``/moments``.

Videos are paths on the server's machine (or uploaded first). A user error is HTTP 400 with ``{"error": message}``,
out of memory 503 with the same shape; requests to the model run one at a time (one GPU)."""


import os
import tempfile
import threading
from pathlib import Path

from ..errors import InputError, ResourceError, VidsparseError
from ..recipe import Recipe


def create_app(adapter=None, recipe: Recipe | None = None, upload_dir: str | None = None, max_new_tokens: int = 64):
    """The FastAPI app. ``adapter``: a loaded ``ModelAdapter`` (None: only ``/moments`` and ``/upload`` work)."""
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    base = recipe or Recipe()
    lock = threading.Lock()
    uploads = Path(upload_dir or tempfile.mkdtemp(prefix="vidsparse-uploads-"))
    uploads.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="vidsparse", version="0.1.0")

    @app.exception_handler(VidsparseError)
    async def _user_error(request: Request, exc: VidsparseError):
        return JSONResponse({"error": str(exc)}, status_code=503 if isinstance(exc, ResourceError) else 400)

    @app.get("/health")
    def health():
        info = {"status": "ok", "recipe": base.to_dict(), "model": None, "device": None}
        if adapter is not None:
            info["model"] = getattr(adapter.model.config, "model_type", type(adapter.model).__name__)
            info["device"] = str(adapter.device)
        return info

    @app.get("/methods")
    def methods():
        from ..registry import FRAMES, INLLM, KV, PATTERNS, SCORERS, TOKENS

        return {"frames": FRAMES.names(), "scorer": SCORERS.names(), "tokens": TOKENS.names() + INLLM.names(),
                "attention": PATTERNS.names(), "kv": KV.names()}

    @app.post("/ask")
    def ask(body: dict):
        if adapter is None:
            raise InputError("this server was started without --model: only /moments is available")
        video, question = _video(body), body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise InputError("'question' must be a non-empty string")
        r = _merge(base, body.get("recipe"))
        from ..pipeline import Pipeline

        n = body.get("max_new_tokens", max_new_tokens)
        if not isinstance(n, int) or n < 1:
            raise InputError("'max_new_tokens' must be a positive integer")
        with lock:
            ans = Pipeline(adapter, r, max_new_tokens=n).ask(video, question)
        return {"answer": ans.text, "stats": ans.stats.to_dict(), "recipe": r.to_dict()}

    @app.post("/moments")
    def moments(body: dict):
        from ..moments import find_moments
        from ..recipe import Budget

        budget = body.get("budget", 16)
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise InputError("'budget' must be an integer number of frames")
        m, _ = find_moments(_video(body), Budget(frames=budget), frames=body.get("frames"),
                            query=body.get("query") or None, scorer=body.get("scorer"))
        return m.to_dict()

    @app.post("/upload")
    def upload(file: UploadFile = File(...)):
        name = Path(file.filename or "video").name
        if not name or name.startswith("."):
            raise InputError("the upload needs a file name")
        dest = uploads / name
        tmp = dest.with_name(dest.name + ".part")
        with open(tmp, "wb") as f:
            while chunk := file.file.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
        return {"video": str(dest)}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    return app


def _video(body: dict) -> str:
    video = body.get("video")
    if not isinstance(video, str) or not video:
        raise InputError("'video' must be a path on the server (POST /upload to send a file)")
    if not os.path.isfile(video):
        raise InputError(f"video {video} does not exist on the server")
    return video


def _merge(base: Recipe, override) -> Recipe:
    if override is None:
        return base
    if not isinstance(override, dict):
        raise InputError("'recipe' must be an object such as {\"tokens\": \"aot\", \"budget\": {\"frames\": 64}}")
    d = base.to_dict()
    budget = dict(d.pop("budget"))
    budget.update(override.get("budget") or {})
    d.update({k: v for k, v in override.items() if k != "budget"})
    d["budget"] = budget
    return Recipe.from_dict(d)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vidsparse</title>
<style>body{font:15px system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem}
input,select{font:inherit;padding:.3rem;margin:.2rem 0;width:100%}label{display:block;margin-top:.6rem;color:#444}
button{font:inherit;padding:.4rem 1rem;margin-top:.8rem}pre{background:#f4f4f4;padding:1rem;white-space:pre-wrap}
.row{display:grid;grid-template-columns:repeat(4,1fr);gap:.6rem}</style></head>
<body><h1>vidsparse</h1>
<form id="f"><label>Video (path on the server)<input id="video" required></label>
<label>Question / query<input id="question"></label>
<div class="row"><label>frames budget<input id="budget" type="number" value="32" min="1"></label>
<label>visual tokens<input id="tokens_budget" type="number" min="1"></label>
<label>frame selector<input id="frames" placeholder="uniform"></label>
<label>token reducer<input id="tokens" placeholder="none"></label></div>
<div class="row"><label>attention<input id="attention" placeholder="dense"></label>
<label>density<input id="density" type="number" step="0.01" min="0.01" max="1"></label>
<label>KV cache<input id="kv" placeholder="full"></label>
<label>&nbsp;<select id="mode"><option value="ask">ask the model</option>
<option value="moments">find moments only</option></select></label></div>
<button>Run</button></form><h2>Result</h2><pre id="out">-</pre>
<script>
const v = id => document.getElementById(id).value.trim();
document.getElementById("f").onsubmit = async e => {
  e.preventDefault();
  const out = document.getElementById("out"); out.textContent = "running…";
  const budget = {frames: parseInt(v("budget") || "32")};
  if (v("tokens_budget")) budget.tokens = parseInt(v("tokens_budget"));
  if (v("density")) budget.density = parseFloat(v("density"));
  let url, body;
  if (v("mode") === "moments") {
    url = "/moments"; body = {video: v("video"), query: v("question"), budget: budget.frames};
    if (v("frames")) body.frames = v("frames");
  } else {
    const recipe = {budget};
    for (const k of ["frames", "tokens", "attention", "kv"]) if (v(k)) recipe[k] = v(k);
    url = "/ask"; body = {video: v("video"), question: v("question"), recipe};
  }
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const d = await r.json();
  out.textContent = d.error ? "error: " + d.error : (d.answer !== undefined ? d.answer + "\\n\\n" : "") +
                    JSON.stringify(d.stats || d, null, 1);
};
</script></body></html>
"""
