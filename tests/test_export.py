"""Training, ONNX export and INT8 quantization, on tiny models and data built in tmp_path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from device_runtime.bundle import load_bundle  # noqa: E402
from device_runtime.routers import create_router  # noqa: E402
from export.config import ConfigError, ExportConfig, QuantizationConfig, TrainConfig  # noqa: E402
from export.data import gain_label  # noqa: E402
from export.onnx_export import ExportMismatchError, check_export, export_onnx, model_inputs, sample_feeds  # noqa: E402
from export.train import neighbor_labels  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _router_artifacts import build_bert, build_data_dir  # noqa: E402

TURNS = [
    ("what is the capital of france", []),
    ("solve for x and explain each step", []),
    ("in spanish", [{"role": "user", "content": "translate good morning"}, {"role": "assistant", "content": "bonjour"}]),
]


# --- settings and labels -----------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"max_length": 4}, "max_length"),
        ({"pooling": "max"}, "pooling"),
        ({"benchmarks": ("mmlu", "hellaswag")}, "unknown benchmark"),
        ({"benchmarks": ()}, "at least one"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"lr_head": 0.0}, "lr_head"),
        ({"neighbor_smoothing": 1.5}, "neighbor_smoothing"),
        ({"train_layers": -1}, "train_layers"),
    ],
)
def test_train_config_validates(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(base=tmp_path, data_dirs=(tmp_path,), **kw)


def test_export_and_quantization_configs_validate():
    with pytest.raises(ConfigError):
        ExportConfig(atol=0)
    with pytest.raises(ConfigError):
        ExportConfig(opset=5)
    with pytest.raises(ConfigError):
        QuantizationConfig(weight_type="QInt4")
    assert QuantizationConfig().to_dict()["method"] == "onnxruntime.quantization.quantize_dynamic"


def test_gain_label():
    assert gain_label("mmlu", 0.0, 1.0) == 1.0
    assert gain_label("mmlu", 1.0, 0.0) == 0.0
    assert gain_label("gsm8k", 1.0, 1.0) == 0.5
    # MT-Bench judge scores 1..10 -> [0, 1].
    assert gain_label("mt-bench", 1.0, 10.0) == 1.0
    assert gain_label("mt-bench", 8.0, 8.0) == 0.5


def test_neighbor_labels_average_same_benchmark_neighbours_only():
    feats = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.0, 1.0], [0.1, 0.99]])
    labels = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    groups = ["a", "a", "a", "b", "b"]
    out = neighbor_labels(feats, labels, groups, k=2)
    # Turn 0's two neighbours (itself left out) are turns 1 and 2.
    assert out[0] == pytest.approx(0.5)
    # Group b has two turns: each sees only the other.
    assert out[3] == pytest.approx(1.0) and out[4] == pytest.approx(0.0)


# --- ONNX export check -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    return build_bert(tmp_path_factory.mktemp("clf"), classifier=True, num_labels=3)


@pytest.mark.slow
def test_export_mismatch_raises(tiny_classifier, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from device_runtime.bundle import load_tokenizer
    from export.model import ClassifierProbability

    hf = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier)).eval()
    module = ClassifierProbability(hf, 0, uses_token_types=True)
    names = model_inputs(has_lp=False, uses_types=True)
    tok = load_tokenizer(tiny_classifier / "tokenizer.json")
    feeds = sample_feeds(tok, TURNS, 64, names)
    path = export_onnx(module, names, feeds, tmp_path / "m.onnx", ExportConfig())
    assert check_export(module, names, feeds, path, atol=1e-4) <= 1e-4
    # Fault injection: the PyTorch side drifts after export.
    with torch.no_grad():
        hf.classifier.bias[0] += 5.0
    with pytest.raises(ExportMismatchError) as err:
        check_export(module, names, feeds, path, atol=1e-4)
    assert err.value.max_abs_diff > 1e-4


@pytest.mark.slow
def test_from_classifier_export(tiny_classifier, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from device_runtime.cli import main

    out = tmp_path / "bundle"
    rc = main(["export", "--from-classifier", str(tiny_classifier), "--out", str(out), "--positive-label", "2"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model_fp32.onnx", "tokenizer.json", "manifest.json"}
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.kind == "classifier" and m.positive_label == 2 and m.num_labels == 3
    assert "softmax(logits)[2]" in m.label
    assert m.quantization["weight_type"] == "QInt8"
    assert m.validation["onnx_vs_pytorch_max_abs_diff"] <= 1e-4

    # The device scorer (FP32) reproduces the classifier's P(label 2).
    hf = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier)).eval()
    fp32 = create_router("bert", bundle=out, fp32=True)
    int8 = create_router("bert", bundle=out)
    for prompt, context in TURNS:
        feeds = fp32.feeds([(prompt, context)])
        with torch.no_grad():
            logits = hf(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
        expected = float(torch.softmax(logits, -1)[0, 2])
        assert fp32.score(prompt, context) == pytest.approx(expected, abs=1e-4)
        assert int8.score(prompt, context) == pytest.approx(expected, abs=0.05)

    # Refuses to overwrite; bad label index is an error, not a crash.
    assert main(["export", "--from-classifier", str(tiny_classifier), "--out", str(out)]) == 1
    assert main(["export", "--from-classifier", str(tiny_classifier), "--out", str(tmp_path / "b2"),
                 "--positive-label", "7"]) == 1


# --- the full trained export, tiny --------------------------------------------------------


@pytest.mark.slow
def test_trained_export_tiny(tmp_path):
    from export.pipeline import export_trained, ship

    base = build_bert(tmp_path / "base")
    data = build_data_dir(tmp_path / "data")
    config = TrainConfig(base=base, data_dirs=(data,), epochs=1, batch_size=8, threads=1, max_length=64,
                         neighbors=5)
    out = export_trained(tmp_path / "bundle", config)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.kind == "head" and m.inputs == ("input_ids", "attention_mask", "token_type_ids", "lp")
    assert m.lp_feature.unit == "words"
    assert "split_of" in m.split_rule
    assert any(k.endswith("mmlu/mmlu_algebra.csv") for k in m.data_sha256)
    for precision in ("pytorch", "onnx_fp32", "onnx_int8"):
        assert set(m.validation[precision]) <= {"mmlu", "gsm8k", "mt-bench"}
    assert m.validation["onnx_vs_pytorch_max_abs_diff"] <= 1e-4
    agree = m.validation["int8_vs_fp32"]
    assert agree["max_abs_diff"] < 0.05
    assert (out / "pytorch" / "head.pt").is_file()

    # FP32 ONNX on the device path equals the PyTorch checkpoint.
    import torch

    from export.model import load_checkpoint

    model = load_checkpoint(out / "pytorch")
    fp32 = create_router("bert", bundle=out, fp32=True)
    feeds = fp32.feeds(TURNS)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(feeds[k]) for k in m.inputs)).numpy()
    assert fp32.score_batch(TURNS) == pytest.approx(list(expected), abs=1e-4)

    shipped = ship(out, tmp_path / "shipped")
    assert sorted(p.name for p in shipped.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]
    assert create_router("bert", bundle=shipped).score("what is the capital of france") == pytest.approx(
        create_router("bert", bundle=out).score("what is the capital of france")
    )
    json.loads((shipped / "manifest.json").read_text())

    # The benchmark runs on a full export and refuses the INT8-only shipped bundle.
    from device_runtime.router_bench import BenchError, format_tables, run_router_bench

    r = run_router_bench(out, repeats=2, lengths=(16, 32))
    assert set(r["latency_ms"]) == {"16", "32"}
    assert set(r["latency_ms"]["16"]) == {"onnx_fp32", "onnx_int8", "pytorch"}
    assert set(r["quality"]) == {"onnx_fp32", "onnx_int8", "pytorch"}
    assert r["size_mb"]["onnx_int8"] < r["size_mb"]["onnx_fp32"]
    assert "| 16 |" in format_tables(r)
    with pytest.raises(BenchError, match="full export"):
        run_router_bench(shipped, repeats=1)


@pytest.mark.slow
def test_trained_export_frozen_encoder_cls_pooling(tmp_path):
    """train_layers=0 (head only, cached pooled features) with the literal h_CLS of eq. (10)."""
    from export.pipeline import export_trained

    base = build_bert(tmp_path / "base", seed=1)
    data = build_data_dir(tmp_path / "data")
    config = TrainConfig(base=base, data_dirs=(data,), epochs=1, batch_size=8, threads=1, max_length=64,
                         train_layers=0, pooling="cls", neighbor_smoothing=0.0, progress=False)
    out = export_trained(tmp_path / "bundle", config)
    m = load_bundle(out).manifest
    assert m.pooling == "cls" and m.training["train_layers"] == 0
    assert m.validation["onnx_vs_pytorch_max_abs_diff"] <= 1e-4
    p = create_router("bert", bundle=out).score(*TURNS[2])
    assert 0.0 <= p <= 1.0
