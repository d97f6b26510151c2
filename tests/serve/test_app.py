"""The HTTP API with FastAPI's TestClient: answers, both request formats, attention, and bad input."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mmfuse[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient

from mmfuse.serve import Request, ServeConfig, VQAAdapter, create_app, decode_image
from tests.serve.helpers import ANSWERS, png_bytes, png_header_only, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def client(model):
    config = ServeConfig(max_upload_bytes=20_000, max_pixels=1_000_000, max_batch=8, max_wait_ms=2)
    with TestClient(create_app(VQAAdapter(model), config)) as c:
        yield c


def ask(client: TestClient, image: bytes, question: str = "what color is the shape?", **fields: Any):
    return client.post("/v1/predict", files={"image": ("x.png", image, "image/png")},
                       data={"question": question, **{k: str(v) for k, v in fields.items()}})


def expected(model, image: bytes, question: str) -> torch.Tensor:
    tensor = decode_image(image, model.config.image_size, max_pixels=10**7)
    return model.answer(tensor[None], [question])[0]  # (A,)


def test_multipart_answer_is_the_models(client, model) -> None:
    image = png_bytes()
    r = ask(client, image)
    assert r.status_code == 200, r.text
    body = r.json()
    probs = expected(model, image, "what color is the shape?")
    assert body["answer"] == ANSWERS[int(probs.argmax())]
    assert [name for name, _ in body["top_k"]] == [ANSWERS[i] for i in probs.topk(5).indices.tolist()]
    torch.testing.assert_close(torch.tensor([p for _, p in body["top_k"]]), probs.topk(5).values,
                               atol=1e-5, rtol=0)
    assert "attention_png" not in body
    assert len(ask(client, image, top_k=2).json()["top_k"]) == 2


def test_json_with_base64_and_attention(client) -> None:
    image = png_bytes((30, 60, 220))
    r = client.post("/v1/predict", json={"image": base64.b64encode(image).decode(), "question": "what shape is it?",
                                         "attention": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == ask(client, image, "what shape is it?").json()["answer"]
    with Image.open(io.BytesIO(base64.b64decode(body["attention_png"]))) as im:
        assert im.format == "PNG" and im.size[0] > 200
    # one panel per word and head: a taller figure than one per word
    heads = client.post("/v1/predict", json={"image": base64.b64encode(image).decode(), "question": "what shape is it?",
                                             "attention": True, "per_head": True}).json()
    with Image.open(io.BytesIO(base64.b64decode(heads["attention_png"]))) as im, \
            Image.open(io.BytesIO(base64.b64decode(body["attention_png"]))) as averaged:
        assert im.size[1] > averaged.size[1]
    # a data URL (what a browser's FileReader gives) is accepted too
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    assert client.post("/v1/predict", json={"image": url, "question": "what shape is it?"}).json() == {
        k: v for k, v in body.items() if k != "attention_png"}


def test_health_page_docs_and_examples(client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["kind"] == "vqa" and health["num_answers"] == len(ANSWERS)
    page = client.get("/")
    assert page.status_code == 200 and 'id="question"' in page.text and "/static/app.js" in page.text
    assert "http" not in client.get("/static/app.js").text  # no CDN: everything from this server
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert client.get("/docs").status_code == 200
    examples = client.get("/v1/examples").json()
    assert len(examples) >= 3
    r = client.get(examples[0]["url"])
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


BAD = [
    # (description, request kwargs, status, words in the message)
    ("not an image", {"files": {"image": ("x.png", b"hello, not a picture", "image/png")},
                      "data": {"question": "what?"}}, 422, "not an image"),
    ("empty file", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"question": "what?"}}, 422, "empty"),
    ("empty question", {"files": {"image": ("x.png", png_bytes(), "image/png")}, "data": {"question": "   "}},
     422, "question: empty"),
    ("no image field", {"data": {"question": "what?"}, "files": {"other": ("x", b"1", "text/plain")}}, 422,
     "image: missing"),
    ("bomb header", {"files": {"image": ("x.png", png_header_only(20000, 20000), "image/png")},
                     "data": {"question": "what?"}}, 400, "pixels"),
    ("over max_pixels", {"files": {"image": ("x.png", png_header_only(2000, 1000), "image/png")},
                         "data": {"question": "what?"}}, 400, "2000x1000 = 2000000 pixels"),
    ("over max_upload_bytes", {"files": {"image": ("x.png", b"\0" * 30_000, "image/png")},
                               "data": {"question": "what?"}}, 413, "limit of 20000 bytes"),
    ("bad top_k", {"files": {"image": ("x.png", png_bytes(), "image/png")},
                   "data": {"question": "what?", "top_k": "0"}}, 422, "top_k"),
    ("bad base64", {"json": {"image": "%%%not base64", "question": "what?"}}, 422, "base64"),
    ("json not an object", {"json": ["what?"]}, 422, "JSON object"),
    ("unknown field", {"json": {"image": base64.b64encode(png_bytes()).decode(), "question": "q", "colour": 1}}, 422,
     "unknown field"),
    ("plain text body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ("huge content-length", {"content": b"x" * 100_000, "headers": {"content-type": "application/json"}}, 413,
     "over the limit"),
]


@pytest.mark.parametrize(("case", "kwargs", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_the_server_goes_on(client, case, kwargs, status, words) -> None:
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert ask(client, png_bytes()).status_code == 200  # still serving


def test_concurrent_requests_are_batched_with_the_same_answers(model) -> None:
    images = [png_bytes((40 * i, 255 - 30 * i, 100)) for i in range(8)]
    questions = ["what color is the shape?", "what shape is it?"] * 4
    config = ServeConfig(max_batch=8, max_wait_ms=300)
    app = create_app(VQAAdapter(model), config)
    results: list[Any] = [None] * 8
    with TestClient(app) as c:
        barrier = threading.Barrier(8)

        def one(i: int) -> None:
            barrier.wait()
            results[i] = ask(c, images[i], questions[i]).json()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batcher = app.state.batcher
        assert batcher.items == 8
        assert batcher.batches < 8  # some requests shared a forward pass
    for i in range(8):
        probs = expected(model, images[i], questions[i])
        assert results[i]["answer"] == ANSWERS[int(probs.argmax())]
        torch.testing.assert_close(results[i]["top_k"][0][1], float(probs.max()), atol=1e-5, rtol=0)


class CaptionAdapter:
    """A model of another kind behind the same HTTP layer: no question, ``{"caption"}``."""

    kind = "caption"
    needs_question = False
    image_size = 16

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def predict(self, requests: list[Request]) -> list[dict[str, Any]]:
        return [{"caption": f"a {r.image.shape[-1]}px image"} for r in requests]

    def attention_png(self, request: Request, *, per_head: bool = False) -> bytes | None:
        return None


def test_another_kind_of_model_plugs_in_through_an_adapter() -> None:
    with TestClient(create_app(CaptionAdapter())) as c:
        r = c.post("/v1/predict", files={"image": ("x.png", png_bytes(), "image/png")}, data={"attention": "true"})
        assert r.status_code == 200, r.text
        assert r.json() == {"caption": "a 16px image", "attention_error": "this model has no attention map to show"}
        assert c.get("/healthz").json()["kind"] == "caption"


def test_cli_serve_missing_checkpoint(tmp_path, capsys) -> None:
    from mmfuse.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--checkpoint", str(tmp_path / "nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfuse: error:") and "not a checkpoint directory" in err
