"""Every call into llama-cpp-python beyond the public ``Llama`` methods.

The conversation needs things llama-cpp-python has no public API for: the raw
bytes of one token, whether a token is a control token, a sampler that reads
the context's logits in place, the end-of-generation test, the tokens the
context holds, and removing the tail of the KV cache.  They go through the
private ``_internals`` module, the ctypes bindings (``llama_cpp.llama_cpp``)
and the private attributes ``Llama._ctx`` and ``Llama._model``, all of which
change between releases without notice.
Keeping them in this one module leaves one file to check against a new
release; ``pyproject.toml`` bounds the version and
``tests/test_llm_adapter.py`` checks both the installed version and that no
other module reaches into these internals.

The lower bound (0.3.17) is what these calls need: ``Llama._model.vocab`` and
``llama_vocab_is_eog`` arrived in 0.3.7, ``swa_full`` in 0.3.10, and before
0.3.17 ``kv_cache_seq_rm`` returned None, which :func:`drop_kv_from` would
read as "cannot remove": every turn would silently prefill from scratch.

``llama_cpp`` is imported only inside the functions, so importing this module
loads no native library.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import llama_cpp


def load_llama(
    model_path: str | Path,
    *,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> "llama_cpp.Llama":
    """Load a GGUF for single-sequence chat with prefix reuse."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF not found: {path}")
    if n_ctx < 16:
        raise ValueError(f"n_ctx must be >= 16, got {n_ctx}")
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        seed=seed,
        verbose=verbose,
        # Sliding-window models (Gemma 3): a full-size SWA cache keeps every
        # position of a prefix we reuse, not only the last window.
        swa_full=True,
    )


def chat_formatter(template: str, eos_token: str, bos_token: str) -> Any:
    """llama-cpp-python's Jinja2 renderer of a GGUF chat template.

    A public class, but imported here so that this module stays the only one
    that imports ``llama_cpp`` at run time.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)


def token_text(llama: "llama_cpp.Llama", token: int) -> str:
    """The vocabulary text of ``token`` ("" for -1, llama.cpp's "no such token")."""
    return llama._model.token_get_text(token) if token != -1 else ""


def token_bytes(llama: "llama_cpp.Llama", token: int) -> bytes:
    """The raw piece of one token (with its leading space, if any)."""
    import llama_cpp

    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(llama._model.vocab, token, buf, size, 0, False)
    if n < 0:  # piece longer than the buffer: llama.cpp reports the size needed
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(llama._model.vocab, token, buf, size, 0, False)
    return buf.raw[: max(n, 0)]


def is_control_token(llama: "llama_cpp.Llama", token: int) -> bool:
    """Whether ``token`` is one only special-token parsing produces (``<|im_end|>``,
    ``<start_of_turn>``, BOS, EOS...): a control or unknown token.

    User-defined tokens are not: llama.cpp matches those in plain text as well.
    """
    import llama_cpp

    attr = llama_cpp.llama_vocab_get_attr(llama._model.vocab, token)
    return bool(attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN))


def is_end_of_generation(llama: "llama_cpp.Llama", token: int) -> bool:
    """Whether ``token`` ends a turn (EOS, EOT, ...), as the GGUF's vocab says."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama._model.vocab, token))


def make_sampler(temperature: float, top_p: float, seed: int) -> Any:
    """Greedy at temperature 0, else top-p then temperature then a seeded draw.

    A native sampler chain: it reads the logits inside the context, where
    ``Llama.sample`` would copy the whole vocabulary's scores into numpy first.
    """
    from llama_cpp import _internals

    sampler = _internals.LlamaSampler()
    if temperature <= 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_p(top_p, 1)
        sampler.add_temp(temperature)
        sampler.add_dist(seed)
    return sampler


def sample(sampler: Any, llama: "llama_cpp.Llama") -> int:
    """The next token, drawn by ``sampler`` from the last evaluated position's logits."""
    return sampler.sample(llama._ctx, -1)


def held_tokens(llama: "llama_cpp.Llama") -> Sequence[int]:
    """The tokens whose keys and values the context holds, in order."""
    return llama._input_ids


def drop_kv_from(llama: "llama_cpp.Llama", position: int) -> bool:
    """Remove every KV cache position from ``position`` on.

    False when the model cannot remove part of a sequence (recurrent models):
    the caller then has to start over.
    """
    return llama._ctx.kv_cache_seq_rm(-1, position, -1)


def save_kv(llama: "llama_cpp.Llama") -> tuple[bytes, tuple[int, ...]]:
    """The KV cache of the context's sequence, as bytes, and the tokens it holds.

    ``llama_state_seq_get_data`` copies only the sequence's cells (about
    18 KiB a token for Gemma 3 270M), not the logits buffer that
    ``Llama.save_state`` copies too.
    """
    import llama_cpp

    ctx = llama._ctx.ctx
    size = int(llama_cpp.llama_state_seq_get_size(ctx, 0))
    buf = (ctypes.c_uint8 * size)()
    written = int(llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0))
    return bytes(buf)[:written], tuple(int(t) for t in llama._input_ids[: llama.n_tokens])


def load_kv(llama: "llama_cpp.Llama", blob: bytes, tokens: Sequence[int]) -> bool:
    """Put back what :func:`save_kv` saved (from this model, any context of the
    same size); the context then holds exactly those keys and values, so what
    follows computes as if they had never left.  False (and an empty cache)
    when llama.cpp refuses the bytes."""
    import llama_cpp

    clear_kv(llama)
    llama.n_tokens = 0
    if not blob or len(tokens) >= llama.n_ctx():
        return False
    buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    if int(llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buf, len(blob), 0)) == 0:
        clear_kv(llama)
        return False
    llama.input_ids[: len(tokens)] = tokens
    llama.n_tokens = len(tokens)
    return True


def clear_kv(llama: "llama_cpp.Llama") -> None:
    """Empty the KV cache (``Llama.reset`` only forgets the token count)."""
    llama._ctx.kv_cache_clear()
