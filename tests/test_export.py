"""Training, ONNX export and INT8 quantization, on tiny models and data built in tmp_path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from device_runtime.routing.bundle import load_bundle  # noqa: E402
from device_runtime.routing.routers import ROUTERS  # noqa: E402
from export.config import ConfigError, ExportConfig, QuantizationConfig, TrainConfig  # noqa: E402
from export.data import gain_label  # noqa: E402
from export.onnx_export import ExportMismatchError, check_export, export_onnx, model_inputs, sample_feeds  # noqa: E402
from export.neighbors import neighbor_labels  # noqa: E402

from _router_artifacts import build_bert, build_data_dir

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
        ({"encoder_layers": 0}, "encoder_layers"),
        ({"neighbor_feature": -1}, "neighbor_feature"),
        ({"neighbor_feature": 10, "train_layers": 1}, "frozen encoder"),
        ({"encoder_layers": 2, "train_layers": 3, "neighbor_feature": 0}, "cannot exceed"),
        ({"head_l2_grid": (1.0, -0.1)}, "head_l2_grid"),
        ({"head_l2_grid": (float("nan"),)}, "head_l2_grid"),
        ({"head_cv_folds": 1}, "head_cv_folds"),
    ],
)
def test_train_config_validates(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(base=tmp_path, data_dirs=(tmp_path,), **kw)


@pytest.mark.parametrize("grid", ["abc", ",", "1,-2"])
def test_cli_rejects_a_bad_head_penalty_grid(tmp_path, grid, capsys):
    from device_runtime.cli.main import main

    assert main(["export", "--out", str(tmp_path / "b"), "--base", str(tmp_path), "--data-dir", str(tmp_path),
                 "--head-l2", grid]) == 1
    assert "head" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_truncate_encoder_keeps_the_bottom_layers(tmp_path):
    from export.train import TrainError, load_encoder, truncate_encoder

    base = build_bert(tmp_path / "base")  # 2 layers
    full = load_encoder(base)
    bottom = full.encoder.layer[0]
    cut = truncate_encoder(load_encoder(base), 1)
    assert len(cut.encoder.layer) == 1 and cut.config.num_hidden_layers == 1
    assert all(
        (a == b).all() for a, b in zip(cut.encoder.layer[0].parameters(), bottom.parameters())
    )
    assert len(truncate_encoder(load_encoder(base), None).encoder.layer) == 2
    with pytest.raises(TrainError, match="has 2 layers"):
        truncate_encoder(load_encoder(base), 3)


def test_neighbor_gain_is_the_mean_label_of_the_k_nearest():
    import torch

    from export.model import NeighborGain

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 8)).astype(np.float32)
    labels = rng.random(40).astype(np.float32)
    module = NeighborGain(torch.from_numpy(bank * 3.0), torch.from_numpy(labels), k=5)  # scale-free
    q = rng.normal(size=(6, 8)).astype(np.float32)
    got = module(torch.from_numpy(q)).squeeze(-1).numpy()  # center 0, scale 1: the raw mean
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ b.T
    want = np.array([labels[np.argsort(-row)[:5]].mean() for row in sim])
    assert got == pytest.approx(want, abs=1e-6)
    scaled = NeighborGain(torch.from_numpy(bank), torch.from_numpy(labels), k=5, center=0.5, scale=0.1)
    assert scaled(torch.from_numpy(q)).squeeze(-1).numpy() == pytest.approx((want - 0.5) / 0.1, abs=1e-5)
    # A bank turn queried with itself is its own nearest neighbour; training uses
    # neighbor_labels (itself left out) for the bank's own turns instead.
    loo = neighbor_labels(bank, labels, ["all"] * 40, 5)
    self_sim = b @ b.T
    np.fill_diagonal(self_sim, -np.inf)
    assert loo == pytest.approx([labels[np.argsort(-row)[:5]].mean() for row in self_sim], abs=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        NeighborGain(torch.from_numpy(bank), torch.from_numpy(labels), k=41)


def test_neighbor_groups_are_the_benchmark_shares_among_the_k_nearest(tmp_path):
    import torch

    from export.model import NeighborGain, RouterModel

    rng = np.random.default_rng(1)
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    labels = rng.random(30).astype(np.float32)
    which = rng.integers(0, 3, 30)
    groups = np.eye(3, dtype=np.float32)[which]
    module = NeighborGain(torch.from_numpy(bank), torch.from_numpy(labels), k=4, center=0.5, scale=0.2,
                          groups=torch.from_numpy(groups), group_names=("a", "b", "c"))
    q = rng.normal(size=(5, 8)).astype(np.float32)
    out = module(torch.from_numpy(q)).numpy()
    assert out.shape == (5, 4)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    for row, got in zip((q / np.linalg.norm(q, axis=1, keepdims=True)) @ b.T, out):
        nn = np.argsort(-row)[:4]
        assert got[0] == pytest.approx((labels[nn].mean() - 0.5) / 0.2, abs=1e-5)
        assert got[1:] == pytest.approx(np.bincount(which[nn], minlength=3) / 4, abs=1e-6)
    # The head reads [h; L_p; k; f; f·L_p].
    from export.train import load_encoder

    model = RouterModel(load_encoder(build_bert(tmp_path / "base")), "mean", True)  # hidden size 32
    model.set_neighbors(module)
    assert model.head.linear.in_features == 32 + 1 + 1 + 2 * 3
    lp = torch.full((5, 1), 0.5)
    extra = model.head_extra(lp, torch.from_numpy(out))
    assert extra.shape == (5, 7)
    assert extra[:, 4:].numpy() == pytest.approx(out[:, 1:] * 0.5)
    with pytest.raises(ValueError, match="groups"):
        NeighborGain(torch.from_numpy(bank), torch.from_numpy(labels), k=4, groups=torch.ones(29, 3))
    with pytest.raises(ValueError, match="group_names"):
        NeighborGain(torch.from_numpy(bank), torch.from_numpy(labels), k=4, groups=torch.from_numpy(groups),
                     group_names=("a", "b"))


@pytest.mark.slow
def test_adamw_head_reads_the_same_neighbour_inputs(tmp_path):
    """--head-l2 none: the head is trained by AdamW on [h; L_p; k; f; f·L_p], and scoring
    the validation turns through the model itself gives the scores train() reports."""
    import torch

    from export.train import train

    config = TrainConfig(base=build_bert(tmp_path / "base"), data_dirs=(build_data_dir(tmp_path / "data"),),
                         epochs=2, batch_size=8, threads=1, max_length=64, encoder_layers=1,
                         neighbor_smoothing=0.0, neighbor_feature=3, head_l2_grid=(), progress=False)
    result = train(config)
    model = result.model
    assert model.neighbors.n_groups == len({e.benchmark for e in result.train_examples}) > 1
    assert model.head.linear.in_features == 32 + 1 + 1 + 2 * model.neighbors.n_groups
    assert [h["epoch"] for h in result.history] == [1, 2]
    from device_runtime.routing.bundle import encode_turn

    e = result.val_examples[0]
    enc = encode_turn(result.tokenizer, e.prompt, e.context, 64)
    with torch.no_grad():
        p = model(torch.tensor([enc.ids]), torch.ones(1, len(enc.ids), dtype=torch.long),
                  torch.tensor([enc.type_ids]), torch.tensor([[result.lp_feature.value(e.prompt)]]))
    assert float(p) == pytest.approx(result.val_scores[0], abs=1e-5)


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

    from device_runtime.routing.bundle import load_tokenizer
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

    from device_runtime.cli.main import main

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
    fp32 = ROUTERS.create("bert", bundle=out, fp32=True)
    int8 = ROUTERS.create("bert", bundle=out)
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
    # --quantize-only is for trained exports: a classifier bundle is refused
    # before its model.onnx is touched.
    before = (out / "model.onnx").read_bytes()
    assert main(["export", "--out", str(out), "--quantize-only"]) == 1
    assert (out / "model.onnx").read_bytes() == before
    # --out naming a file is an error, not a traceback.
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["export", "--from-classifier", str(tiny_classifier), "--out", str(afile)]) == 1


@pytest.mark.slow
def test_single_logit_classifier_exports_sigmoid_as_label_one(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from device_runtime.cli.main import main

    clf = build_bert(tmp_path / "clf1", classifier=True, num_labels=1)
    out = tmp_path / "bundle"
    assert main(["export", "--from-classifier", str(clf), "--out", str(out), "--positive-label", "1"]) == 0
    m = load_bundle(out).manifest
    assert m.num_labels == 1 and m.positive_label == 1 and "σ(logit)" in m.label and "1 −" not in m.label
    hf = AutoModelForSequenceClassification.from_pretrained(str(clf)).eval()
    fp32 = ROUTERS.create("bert", bundle=out, fp32=True)
    prompt, context = TURNS[0]
    with torch.no_grad():
        logit = hf(**{k: torch.from_numpy(v) for k, v in fp32.feeds([(prompt, context)]).items()}).logits
    assert fp32.score(prompt, context) == pytest.approx(float(torch.sigmoid(logit[0, 0])), abs=1e-4)
    assert main(["export", "--from-classifier", str(clf), "--out", str(tmp_path / "b2"),
                 "--positive-label", "2"]) == 1


# --- the full trained export, tiny --------------------------------------------------------


def _assert_validation_rows(m, out, data, config):
    """The manifest's validation rows are the routing metrics of the validation
    split, one per benchmark in it (all three have a quality gap in the tiny
    data); the ONNX rows are exactly what the device scorer gives on those turns."""
    from collections import Counter

    from device_runtime.routing.routers.bert import BertRouter
    from export.data import load_examples
    from export.evaluate import metrics_by_benchmark

    examples = load_examples((data,), config.benchmarks, val_fraction=config.val_fraction)
    val = [e for e in examples if e.split == "val"]
    counts = Counter(e.benchmark for e in val)
    assert set(counts) == {"mmlu", "gsm8k", "mt-bench"}
    assert m.validation["turns"] == len(val) == m.training["val_turns"]
    for precision in ("pytorch", "onnx_fp32", "onnx_int8"):
        rows = m.validation[precision]
        assert set(rows) == set(counts), precision
        for bench, row in rows.items():
            turns = [e for e in val if e.benchmark == bench]
            assert row["n"] == counts[bench]
            assert row["q_device"] == pytest.approx(np.mean([e.quality_device for e in turns]))
            assert row["q_edge"] == pytest.approx(np.mean([e.quality_edge for e in turns]))
            assert np.isfinite([row["apgr"], row["cpt50"], row["cpt80"]]).all()
    for precision, fp32 in (("onnx_fp32", True), ("onnx_int8", False)):
        router = BertRouter(out, threads=config.threads, fp32=fp32, batch_size=1)
        want = metrics_by_benchmark(val, [router.score(e.prompt, e.context) for e in val])
        assert m.validation[precision] == want, precision


@pytest.mark.slow
def test_trained_export_tiny(tmp_path):
    from export.pipeline import export_trained, ship

    base = build_bert(tmp_path / "base")
    data = build_data_dir(tmp_path / "data")
    config = TrainConfig(base=base, data_dirs=(data,), epochs=1, batch_size=8, threads=1, max_length=64,
                         neighbors=5, encoder_layers=2, train_layers=1, neighbor_feature=0, pooling="cls")
    out = export_trained(tmp_path / "bundle", config)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.kind == "head" and m.inputs == ("input_ids", "attention_mask", "token_type_ids", "lp")
    assert m.pooling == "cls"  # the literal h_CLS of eq. (10), top layer fine-tuned
    assert m.lp_feature.unit == "words"
    assert "split_of" in m.split_rule
    assert any(k.endswith("mmlu/mmlu_algebra.csv") for k in m.data_sha256)
    _assert_validation_rows(m, out, data, config)
    assert m.validation["onnx_vs_pytorch_max_abs_diff"] <= 1e-4
    agree = m.validation["int8_vs_fp32"]
    assert agree["max_abs_diff"] < 0.05
    assert (out / "pytorch" / "head.pt").is_file()

    # FP32 ONNX on the device path equals the PyTorch checkpoint.
    import torch

    from export.model import load_checkpoint

    model = load_checkpoint(out / "pytorch")
    fp32 = ROUTERS.create("bert", bundle=out, fp32=True)
    feeds = fp32.feeds(TURNS)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(feeds[k]) for k in m.inputs)).numpy()
    assert fp32.score_batch(TURNS) == pytest.approx(list(expected), abs=1e-4)

    shipped = ship(out, tmp_path / "shipped")
    assert sorted(p.name for p in shipped.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]
    assert ROUTERS.create("bert", bundle=shipped).score("what is the capital of france") == pytest.approx(
        ROUTERS.create("bert", bundle=out).score("what is the capital of france")
    )
    json.loads((shipped / "manifest.json").read_text())

    # The benchmark runs on a full export and refuses the INT8-only shipped bundle.
    from export.router_bench import BenchError, format_tables, run_router_bench

    r = run_router_bench(out, repeats=2, lengths=(16, 32))
    assert set(r["latency_ms"]) == {"16", "32"}
    assert set(r["latency_ms"]["16"]) == {"onnx_fp32", "onnx_int8", "pytorch"}
    assert set(r["quality"]) == {"onnx_fp32", "onnx_int8", "pytorch"}
    assert r["size_mb"]["onnx_int8"] < r["size_mb"]["onnx_fp32"]
    assert "| 16 |" in format_tables(r)
    with pytest.raises(BenchError, match="full export"):
        run_router_bench(shipped, repeats=1)


@pytest.mark.slow
def test_trained_export_frozen_encoder_neighbor_feature(tmp_path):
    """train_layers=0 (head only, cached pooled features) with the neighbour feature k(h),
    h scaled to unit length, on an encoder cut to its bottom layer."""
    from export.pipeline import export_trained

    base = build_bert(tmp_path / "base", seed=1)
    data = build_data_dir(tmp_path / "data")
    config = TrainConfig(base=base, data_dirs=(data,), epochs=1, batch_size=8, threads=1, max_length=64,
                         encoder_layers=1, train_layers=0, pooling="mean", normalize=True,
                         neighbor_smoothing=0.0, neighbor_feature=3, progress=False)
    out = export_trained(tmp_path / "bundle", config)
    m = load_bundle(out).manifest
    assert m.pooling == "mean" and m.training["train_layers"] == 0
    assert m.training["encoder_layers"] == 1 and m.base_model.endswith("bottom 1 layers")
    assert m.training["neighbor_feature"] == 3 and (out / "pytorch" / "neighbors.pt").is_file()
    # The head was fitted full batch, its penalty on W_h chosen from the default grid by CV.
    (fit,) = m.training["history"]
    assert fit["head_fit"] == "lbfgs" and fit["l2_h"] in m.training["head_l2_grid"]
    assert [row["l2_h"] for row in fit["cv"]] == m.training["head_l2_grid"]
    assert json.loads((out / "pytorch" / "encoder" / "config.json").read_text())["num_hidden_layers"] == 1
    assert m.validation["onnx_vs_pytorch_max_abs_diff"] <= 1e-4
    p = ROUTERS.create("bert", bundle=out).score(*TURNS[2])
    assert 0.0 <= p <= 1.0
