"""The device-side BERT router: bundle validation, input encoding, scoring, the CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.routing.bundle import (
    BundleError,
    BundleManifest,
    default_bundle_dir,
    encode_turn,
    load_bundle,
    load_tokenizer,
)
from device_runtime.routing.routers import ROUTERS, RouterError

from _router_artifacts import build_tokenizer
from conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]
HAS_DEFAULT = (default_bundle_dir() / "model.onnx").is_file()
needs_default = pytest.mark.skipif(not HAS_DEFAULT, reason="default bundle not built")


# --- manifest and bundle validation ---------------------------------------------


def _head_manifest(**kw) -> dict:
    d = {
        "kind": "head", "base_model": "tiny", "max_length": 64,
        "inputs": ["input_ids", "attention_mask", "token_type_ids", "lp"],
        "label": "test", "lp_feature": {"unit": "words", "transform": "log1p", "scale": 8.0},
    }
    d.update(kw)
    return d


def test_manifest_roundtrip(tmp_path):
    m = BundleManifest.from_dict(_head_manifest())
    m.write(tmp_path)
    again = BundleManifest.from_dict(json.loads((tmp_path / "manifest.json").read_text()))
    assert again == m
    assert again.lp_feature.value("one two three") == pytest.approx(0.17328679513998632)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "regressor"}, "kind"),
        ({"max_length": 3}, "max_length"),
        ({"inputs": ["input_ids"]}, "attention_mask"),
        ({"lp_feature": None}, "lp_feature"),
        ({"lp_feature": {"unit": "words", "transform": "log1p", "scale": -1}}, "scale"),
        ({"surprise": 1}, "unknown keys"),
        ({"format_version": 99}, "format_version"),
        ({"kind": "classifier", "num_labels": 3, "positive_label": 3}, "positive_label"),
    ],
)
def test_manifest_rejects_bad_fields(change, message):
    with pytest.raises(BundleError, match=message):
        BundleManifest.from_dict(_head_manifest(**change))


def test_manifest_requires_keys():
    with pytest.raises(BundleError, match="lacks"):
        BundleManifest.from_dict({"kind": "head"})


def test_load_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="lacks manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    (tmp_path / "model.onnx").write_bytes(b"")
    build_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(BundleError, match="invalid JSON"):
        load_bundle(tmp_path)


def test_router_rejects_bad_bundles(tmp_path):
    with pytest.raises(RouterError, match="does not exist"):
        ROUTERS.create("bert", bundle=tmp_path / "missing")
    BundleManifest.from_dict(_head_manifest()).write(tmp_path)
    build_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(RouterError, match="cannot load"):
        ROUTERS.create("bert", bundle=tmp_path)
    with pytest.raises(RouterError, match="threads"):
        ROUTERS.create("bert", bundle=tmp_path, threads=0)


# --- input encoding (shared by training and device) -------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_encode_single_turn(tok):
    enc = encode_turn(tok, "what is the capital of france", [], 64)
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert enc.tokens[1:-1] == "what is the capital of france".split()


def test_history_truncated_from_the_oldest_end(tok):
    prompt = "solve for x"
    context = [
        {"role": "user", "content": "one two three four five six seven eight nine ten"},
        {"role": "assistant", "content": "good morning bonjour"},
    ]
    enc = encode_turn(tok, prompt, context, 16)
    assert len(enc.ids) == 16
    toks = enc.tokens
    # [CLS] prompt [SEP] history-tail [SEP]: the prompt is whole, the newest history survives.
    assert toks[: 5] == ["[CLS]", "solve", "for", "x", "[SEP]"]
    assert toks[-4:-1] == ["good", "morning", "bonjour"]
    assert "one" not in toks
    assert set(enc.type_ids[5:]) == {1}


def test_long_prompt_keeps_its_head_and_drops_history(tok):
    prompt = " ".join(["two"] * 100)
    enc = encode_turn(tok, prompt, [{"role": "user", "content": "three"}], 32)
    assert len(enc.ids) == 32
    assert "three" not in enc.tokens
    enc_alone = encode_turn(tok, prompt, [], 32)
    assert enc_alone.ids == enc.ids


# --- scoring on the shipped default bundle (real ONNX) --------------------------------


@needs_default
def test_default_bundle_is_int8_only_and_small():
    b = load_bundle()
    assert not b.fp32_model_path.exists()
    assert b.model_path.stat().st_size <= 30e6
    assert b.manifest.quantization["method"].endswith("quantize_dynamic")
    assert b.manifest.validation["onnx_int8"]["mmlu"]["apgr"] > 0.5


@needs_default
@pytest.mark.slow
def test_default_bundle_scores_in_order():
    router = ROUTERS.create("bert")
    assert router.tau_r is None
    turns = [
        ("What is 2 + 2?", []),
        ("Prove that there are infinitely many primes of the form 4k + 3.", []),
        ("And now in French?", [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]),
    ]
    single = [router.score(p, c) for p, c in turns]
    assert all(0.0 <= p <= 1.0 for p in single)
    assert router.score_batch(turns) == pytest.approx(single, abs=1e-9)
    # Batched calls pad and share INT8 activation scales: close, not bit-equal.
    batched = ROUTERS.create("bert", batch_size=8).score_batch(turns)
    assert batched == pytest.approx(single, abs=0.02)


@needs_default
@pytest.mark.slow
def test_device_path_imports_no_torch():
    code = (
        "import sys\n"
        "from device_runtime.routing.routers import ROUTERS\n"
        "r = ROUTERS.create('bert', threads=1)\n"
        "p = r.score('What is the capital of France?')\n"
        "ps = r.score_batch([('hi', []), ('and then?', [{'role': 'user', 'content': 'hi'}])])\n"
        "assert 0 <= p <= 1 and len(ps) == 2\n"
        "from device_runtime.cli.main import main\n"
        "assert main(['router', 'score']) == 0\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules)\n"
        "print('LOADED:' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input='{"prompt": "hi"}\n', capture_output=True,
                         text=True, cwd=ROOT, env=cli_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    # The CLI's score line, then the list of heavy modules loaded: none.
    assert json.loads(out.stdout.splitlines()[0])["score"] >= 0
    assert out.stdout.strip().endswith("LOADED:"), out.stdout


# --- the CLI contract -------------------------------------------------------------------


@needs_default
@pytest.mark.slow
def test_cli_scores_jsonl_in_order(run_cli):
    lines = [
        {"prompt": "What is the capital of France?"},
        {"prompt": "Compute the integral of x^2 from 0 to 3.", "context": []},
        {"prompt": "Shorter please.", "context": [{"role": "user", "content": "Write a poem."},
                                                  {"role": "assistant", "content": "Roses are red."}]},
    ]
    out = run_cli("router", "score", stdin="".join(json.dumps(x) + "\n" for x in lines))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3 and all(set(r) == {"score"} for r in rows)
    router = ROUTERS.create("bert")
    expected = [router.score(x["prompt"], x.get("context", [])) for x in lines]
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"prompt": ""}', "non-empty string"),
        ('{"prompt": 3}', "non-empty string"),
        ('{"context": []}', "non-empty string"),
        ('{"prompt": "hi", "context": "earlier"}', "list of messages"),
        ('{"prompt": "hi", "context": [{"role": "system", "content": "x"}]}', "role"),
        ('{"prompt": "hi", "context": [{"role": "user", "content": 5}]}', "content"),
        ("", "invalid JSON"),
        ('{"prompt": "x \\ud800"}', "lone surrogate"),
        ('{"prompt": "hi", "context": [{"role": "user", "content": "\\udc00"}]}', "lone surrogate"),
    ],
)
def test_cli_malformed_line_names_its_number(run_cli, bad_line, message):
    stdin = '{"prompt": "fine"}\n' + bad_line + "\n" + '{"prompt": "also fine"}\n'
    # A bundle that does not exist: validation happens before any model is loaded.
    out = run_cli("router", "score", "--bundle", "/nonexistent/bundle", stdin=stdin)
    assert out.returncode != 0
    assert "line 2" in out.stderr and message in out.stderr, out.stderr
    assert out.stdout == ""


def test_cli_input_that_is_not_utf8_names_its_line():
    out = subprocess.run(
        [sys.executable, "-m", "device_runtime.cli.main", "router", "score", "--bundle", "/nonexistent/bundle"],
        input=b'{"prompt": "fine"}\n{"prompt": "\xff\xfe"}\n', capture_output=True, cwd=ROOT, env=cli_env(),
        timeout=300,
    )
    assert out.returncode == 2 and out.stdout == b""
    assert b"line 2: not valid UTF-8" in out.stderr


@needs_default
@pytest.mark.slow
def test_cli_stops_quietly_when_its_reader_goes_away():
    """`router score < big.jsonl | head -1`: no traceback when the pipe closes."""
    lines = "".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3000))
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_runtime.cli.main", "router", "score", "--batch-size", "64"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=cli_env(),
    )
    proc.stdin.write(lines.encode())
    proc.stdin.close()
    assert json.loads(proc.stdout.readline())["score"] >= 0
    proc.stdout.close()  # the reader stops after one line
    assert proc.wait(timeout=300) == 1
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_manifest_that_is_not_utf8_is_a_bundle_error(run_cli, tmp_path):
    for name in ("model.onnx", "tokenizer.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{}")
    out = run_cli("router", "score", "--bundle", str(tmp_path), stdin='{"prompt": "hi"}\n')
    assert out.returncode == 1 and "not UTF-8" in out.stderr and "Traceback" not in out.stderr


def test_cli_bad_bundle_is_an_error(run_cli, tmp_path):
    out = run_cli("router", "score", "--bundle", str(tmp_path), stdin='{"prompt": "hi"}\n')
    assert out.returncode != 0
    assert "lacks manifest.json" in out.stderr
