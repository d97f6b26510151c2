"""mmfuse.export: each exported program (and ONNX Runtime on the ONNX file) gives the PyTorch model's logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mmfuse.data import AnswerVocab, WordTokenizer
from mmfuse.export import ExportableVQA, example_inputs, export, load_exported
from mmfuse.models.vqa import VQAConfig, VQAModel

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_MODEL = {"cnn_stages": [[8], [16]], "dim": 32, "text_dim": 32, "num_heads": 2, "image_size": 32, "depth": 1}
QUESTIONS = ["what color is the shape?", "what shape is it?", "is there a red shape?"]
# (questions, batch): a single unpadded row, then several rows of different lengths (padding, masks)
CASES = [(["what shape?"], 1), (["what color is the big shape in the image?", "is it red?", "what?"], 5)]


def untrained(fusion: str = "fusion_transformer") -> VQAModel:
    tokenizer = WordTokenizer.fit(QUESTIONS)
    config = VQAConfig(num_answers=4, vocab_size=len(tokenizer), fusion=fusion, **TINY_MODEL)
    model = VQAModel(config, answers=AnswerVocab(["blue", "circle", "red", "yes"]), tokenizer=tokenizer)
    return model.eval()


def _run(fmt: str, path: Path, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy(), "ids": ids.numpy(), "mask": mask.numpy()}
        return torch.from_numpy(session.run(["logits"], feed)[0])
    with torch.no_grad():
        return load_exported(path, fmt)(images, ids, mask)


def test_wrapper_matches_the_model_with_repeated_questions() -> None:
    model = untrained()
    # repeated rows take VQAModel's dedup path; the wrapper encodes every row
    images, ids, mask = example_inputs(model, QUESTIONS, batch=7)
    assert ids.shape[1] > 1 and not bool(mask.all())
    with torch.no_grad():
        torch.testing.assert_close(ExportableVQA(model)(images, ids, mask), model(images, ids, mask),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize(("fmt", "fusion"), [("onnx", "fusion_transformer"), ("torchscript", "fusion_transformer"),
                                             ("torch-export", "fusion_transformer"), ("torch-export", "self_attention"),
                                             ("torch-export", "cross_attention")])
def test_exported_logits_match_pytorch(fmt: str, fusion: str, tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'mmfuse[export]')")
    model = untrained(fusion)
    path = export(model, tmp_path / ("model.pt2" if fmt == "torch-export" else f"model.{fmt}"), fmt)
    lengths = set()
    for questions, batch in CASES:
        images, ids, mask = example_inputs(model, questions, batch=batch)
        lengths.add(ids.shape[1])
        with torch.no_grad():
            expected = model(images, ids, mask)
        got = _run(fmt, path, images, ids, mask)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) < 1e-4
    assert len(lengths) == 2


def test_sidecar_lets_a_deployment_tokenize_without_mmfuse(tmp_path: Path) -> None:
    model = untrained()
    path = export(model, tmp_path / "model.pt2", "torch-export")
    meta = json.loads(Path(f"{path}.json").read_text())
    assert meta["answers"] == model.answers.names and meta["image_size"] == 32
    tok = meta["tokenizer"]
    index = {w: i for i, w in enumerate(tok["vocab"])}

    def encode(text: str) -> list[int]:  # what a deployment in another language would do
        return [tok["cls_id"], *(index.get(t, tok["unk_id"]) for t in re.findall(tok["pattern"], text.lower()))]

    for q in ["What shape is it?", "is there a purple shape?"]:
        ids, mask = model.tokenize([q])
        assert encode(q) == ids[0][mask[0]].tolist()


def test_bad_format_and_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(untrained(), tmp_path / "m", "tflite")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"name the file \*\.pt2"):
        export(untrained(), tmp_path / "m.pt", "torch-export")


def test_cli_export_and_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmfuse.cli import main

    run = tmp_path / "run"
    untrained().save_pretrained(run)
    out = tmp_path / "m.ts"
    assert main(["export", "--checkpoint", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert out.is_file() and Path(f"{out}.json").is_file()
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(tmp_path / "nope"), "--format", "onnx", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfuse: error:") and "not a checkpoint directory" in err and "\n" not in err
