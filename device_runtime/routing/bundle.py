"""Router bundles: an ONNX model, its tokenizer and a manifest saying how they were made.

A bundle directory holds::

    model.onnx        INT8 (dynamic quantization) router; what the device runs
    model_fp32.onnx   FP32 export (full export dirs only; not shipped)
    tokenizer.json    a ``tokenizers`` tokenizer
    manifest.json     :class:`BundleManifest`

This module is on the device path: it imports only the standard library,
numpy and (inside functions) ``tokenizers``.  The same :func:`encode_turn` is
used when training, so the device builds exactly the input the model was
trained on (prompt first, dialogue history after it, history truncated from
the oldest end so that the prompt always fits).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from device_runtime.core.messages import DIALOGUE_ROLES, check_message

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
MODEL_FP32_FILE = "model_fp32.onnx"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
#: Bundle kinds: a trained eq. (10) head, or an exported sequence classifier.
KINDS = ("head", "classifier")
ROLES = DIALOGUE_ROLES


class BundleError(ValueError):
    """A bundle directory or its manifest is missing, incomplete or malformed."""


def default_bundle_dir() -> Path:
    """The bundle shipped with the package (INT8 model only)."""
    return Path(__file__).resolve().parents[1] / "bundles" / "default"


@dataclass(frozen=True)
class LpFeature:
    """How the prompt length L_p of eq. (10) enters the head.

    ``value = log1p(L_p) / scale`` with L_p counted in ``unit`` ("words": the
    prompt split on whitespace, as the paper counts tokens).  The log keeps a
    3,000-word prompt from swamping the 384 encoder features.
    """

    unit: str = "words"
    transform: str = "log1p"
    scale: float = 8.0

    def __post_init__(self) -> None:
        if self.unit != "words":
            raise BundleError(f"lp_feature.unit must be 'words', got {self.unit!r}")
        if self.transform != "log1p":
            raise BundleError(f"lp_feature.transform must be 'log1p', got {self.transform!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise BundleError(f"lp_feature.scale must be a positive number, got {self.scale!r}")

    def value(self, prompt: str) -> float:
        return math.log1p(len(prompt.split())) / self.scale


@dataclass(frozen=True)
class BundleManifest:
    """What a bundle is and how it was made (the manifest.json schema)."""

    kind: str
    base_model: str
    max_length: int
    #: Names of the ONNX graph's inputs, in order.
    inputs: tuple[str, ...]
    #: What p means, in words (e.g. "P(edge helps)": soft label (q_edge - q_device + 1) / 2).
    label: str
    #: eq. (10)'s L_p input; None for a classifier bundle (no length feature).
    lp_feature: LpFeature | None = None
    #: classifier bundles: p = softmax(logits)[positive_label].
    positive_label: int | None = None
    num_labels: int | None = None
    pooling: str = "cls"
    #: How the turn is laid out for the encoder.
    input_format: str = "[CLS] prompt [SEP] history [SEP]; history = 'role: content' messages joined by newlines, truncated from the oldest end"
    quantization: Mapping[str, Any] = field(default_factory=dict)
    validation: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    #: sha256 of every training data file, by path relative to its data dir.
    data_sha256: Mapping[str, str] = field(default_factory=dict)
    split_rule: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise BundleError(
                f"manifest format_version {self.format_version!r} is not supported (expected {FORMAT_VERSION})"
            )
        if self.kind not in KINDS:
            raise BundleError(f"manifest kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.max_length, int) or not 8 <= self.max_length <= 8192:
            raise BundleError(f"manifest max_length must be an integer in [8, 8192], got {self.max_length!r}")
        inputs = tuple(self.inputs)
        object.__setattr__(self, "inputs", inputs)
        if "input_ids" not in inputs or "attention_mask" not in inputs:
            raise BundleError(f"manifest inputs must include input_ids and attention_mask, got {inputs}")
        if self.kind == "head":
            if self.lp_feature is None or "lp" not in inputs:
                raise BundleError("a 'head' bundle needs lp_feature and an 'lp' model input (eq. 10)")
        else:
            if self.num_labels is None or self.positive_label is None:
                raise BundleError("a 'classifier' bundle needs num_labels and positive_label")
            # A single-logit classifier has two labels: 1 is σ(logit), 0 is 1 − σ(logit).
            if not 0 <= self.positive_label < max(self.num_labels, 2):
                raise BundleError(
                    f"positive_label {self.positive_label} out of range for {self.num_labels} labels"
                )
        if self.pooling not in ("cls", "mean"):
            raise BundleError(f"manifest pooling must be 'cls' or 'mean', got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = list(self.inputs)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BundleManifest":
        if not isinstance(data, Mapping):
            raise BundleError("manifest must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"manifest has unknown keys {sorted(unknown)}")
        required = {"kind", "base_model", "max_length", "inputs", "label"}
        missing = required - set(data)
        if missing:
            raise BundleError(f"manifest lacks {sorted(missing)}")
        kw = dict(data)
        lp = kw.get("lp_feature")
        if lp is not None:
            if not isinstance(lp, Mapping):
                raise BundleError("manifest lp_feature must be an object or null")
            try:
                kw["lp_feature"] = LpFeature(**lp)
            except TypeError as exc:
                raise BundleError(f"manifest lp_feature: {exc}") from None
        return cls(**kw)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory."""

    directory: Path
    manifest: BundleManifest

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def fp32_model_path(self) -> Path:
        return self.directory / MODEL_FP32_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER_FILE


def load_bundle(directory: str | Path | None = None) -> Bundle:
    """Read and validate a bundle directory (None: the default bundle)."""
    root = Path(directory) if directory is not None else default_bundle_dir()
    if not root.is_dir():
        raise BundleError(f"bundle directory {str(root)!r} does not exist or is not a directory")
    for name in (MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE):
        if not (root / name).is_file():
            raise BundleError(f"bundle {str(root)!r} lacks {name}")
    try:
        data = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{root / MANIFEST_FILE}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise BundleError(f"{root / MANIFEST_FILE}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise BundleError(f"cannot read {root / MANIFEST_FILE}: {exc.strerror or exc}") from None
    try:
        manifest = BundleManifest.from_dict(data)
    except TypeError as exc:
        raise BundleError(f"{root / MANIFEST_FILE}: {exc}") from None
    return Bundle(root, manifest)


# --- input encoding (shared by training and the device) ------------------------


def validate_messages(context: Any, where: str = "context") -> list[dict[str, str]]:
    """Check a dialogue history: a list of {"role": "user"|"assistant", "content": str}."""
    if context is None:
        return []
    if not isinstance(context, (list, tuple)):
        raise ValueError(f"{where} must be a list of messages, got {type(context).__name__}")
    return [check_message(m, f"{where}[{i}]", roles=ROLES) for i, m in enumerate(context)]


def history_text(context: Sequence[Mapping[str, str]]) -> str:
    """The dialogue history as one string, oldest message first."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in context)


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` with its own truncation and padding switched off.

    :func:`encode_turn` truncates (so the prompt always fits) and the scorer
    pads, so both must be off here to make training and device agree.
    """
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise BundleError(f"cannot load tokenizer {str(path)!r}: {exc}") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def encode_turn(tokenizer, prompt: str, context: Sequence[Mapping[str, str]], max_length: int):
    """Token ids, type ids and mask for one turn: ``[CLS] prompt [SEP] history [SEP]``.

    The prompt keeps its first ``max_length - specials`` tokens; the history
    fills what is left, keeping its newest tokens (truncated from the oldest
    end).  Returns a ``tokenizers.Encoding``.
    """
    enc_prompt = tokenizer.encode(prompt, add_special_tokens=False)
    if context:
        budget_specials = tokenizer.num_special_tokens_to_add(True)
        room = max_length - budget_specials - len(enc_prompt.ids)
        if room <= 0:
            enc_prompt.truncate(max_length - tokenizer.num_special_tokens_to_add(False))
            return tokenizer.post_process(enc_prompt, None, add_special_tokens=True)
        enc_hist = tokenizer.encode(history_text(context), add_special_tokens=False)
        if len(enc_hist.ids) > room:
            enc_hist.truncate(room, direction="left")
        return tokenizer.post_process(enc_prompt, enc_hist, add_special_tokens=True)
    specials = tokenizer.num_special_tokens_to_add(False)
    if len(enc_prompt.ids) > max_length - specials:
        enc_prompt.truncate(max_length - specials)
    return tokenizer.post_process(enc_prompt, None, add_special_tokens=True)


def batch_arrays(encodings: Sequence[Any], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad encodings to the longest one: int64 numpy arrays by ONNX input name."""
    import numpy as np

    n = len(encodings)
    width = max(len(e.ids) for e in encodings)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for i, e in enumerate(encodings):
        k = len(e.ids)
        ids[i, :k] = e.ids
        types[i, :k] = e.type_ids
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id ([PAD] or <pad>), else 0."""
    for tok in ("[PAD]", "<pad>"):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return int(i)
    return 0
