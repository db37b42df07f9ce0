"""The HTTP server with FastAPI's test client: real app, real pipeline on a tiny random Qwen2.5-VL."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from vidsparse.models import load_adapter
    from vidsparse.models.random import build_random_qwen2_5_vl
    from vidsparse.recipe import Budget, Recipe
    from vidsparse.serve.app import create_app

    path = build_random_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny")
    app = create_app(load_adapter(path, device="cpu"), Recipe(budget=Budget(frames=6)),
                     upload_dir=str(tmp_path_factory.mktemp("uploads")), max_new_tokens=3)
    return TestClient(app)


def test_health_methods_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == "qwen2_5_vl" and h["recipe"]["budget"]["frames"] == 6
    m = client.get("/methods").json()
    assert "fastv" in m["tokens"] and "aot" in m["tokens"] and "snapkv" in m["kv"] and "grid" in m["attention"]
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "/ask" in page.text


def test_ask_with_recipe_override(client, synth):
    r = client.post("/ask", json={"video": synth[0], "question": "what is on screen ?",
                                  "recipe": {"tokens": "evs", "budget": {"tokens": 30}}})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["stats"]["frames"] == 6 and d["stats"]["visual_tokens"] == 30 and d["recipe"]["tokens"] == "evs"
    assert 1 <= d["stats"]["new_tokens"] <= 3 and isinstance(d["answer"], str)


def test_moments_and_upload(client, synth):
    from pathlib import Path

    data = Path(synth[0]).read_bytes()
    up = client.post("/upload", files={"file": ("clip.mp4", data, "video/mp4")})
    assert up.status_code == 200
    video = up.json()["video"]
    assert Path(video).read_bytes() == data
    d = client.post("/moments", json={"video": video, "budget": 4}).json()
    assert len(d["frames"]) == 4 and d["video"] == video


@pytest.mark.parametrize("body, msg", [
    ({"video": "/no/such.mp4", "question": "q"}, "does not exist"),
    ({"question": "q"}, "'video'"),
    ({"video": "__SYNTH__", "question": " "}, "question"),
    ({"video": "__SYNTH__", "question": "q", "recipe": {"tokens": "nosuch"}}, "unknown"),
    ({"video": "__SYNTH__", "question": "q", "recipe": {"budget": {"frames": 0}}}, "budget.frames"),
    ({"video": "__SYNTH__", "question": "q", "recipe": "aot"}, "'recipe'"),
])
def test_bad_requests_are_400_with_a_message(client, synth, body, msg):
    body = {k: (synth[0] if v == "__SYNTH__" else v) for k, v in body.items()}
    r = client.post("/ask", json=body)
    assert r.status_code == 400 and msg in r.json()["error"]


def test_server_without_model_only_searches(synth):
    from fastapi.testclient import TestClient

    from vidsparse.serve.app import create_app

    c = TestClient(create_app())
    assert c.get("/health").json()["model"] is None
    r = c.post("/ask", json={"video": synth[0], "question": "q"})
    assert r.status_code == 400 and "without --model" in r.json()["error"]
    assert c.post("/moments", json={"video": synth[0], "budget": 3}).status_code == 200
