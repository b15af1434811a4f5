"""The BERT router on the device: eq. (10) from an ONNX bundle.

Runs on onnxruntime and ``tokenizers`` only (plus numpy): no torch,
transformers or optimum, so a phone-class device can score without the
export stack.  ``p`` is the bundle's score that the turn needs the edge LLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from device_runtime.routing.bundle import (
    Bundle,
    BundleError,
    batch_arrays,
    encode_turn,
    load_bundle,
    load_tokenizer,
    pad_id_of,
)
from device_runtime.routing.routers.base import ROUTERS, Message, Router, RouterError

#: Turns per onnxruntime call.  1 by default: dynamic INT8 quantization
#: scales activations per call (and padding enters those scales), so with
#: larger batches a turn's p shifts with its neighbours (mean 0.005, at most
#: ~0.05 on 1,000 validation turns; docs/router.md).
#: Batch 1 makes p a function of the turn alone, the same in the CLI, the
#: simulator and on the device.  Raise it for throughput.
DEFAULT_BATCH = 1


@ROUTERS.register("bert")
class BertRouter(Router):
    """p_t = σ(Wᵀ[h_CLS; L_p] + b) (eq. 10), or a classifier's P(label k).

    ``bundle``: a bundle directory (None: the shipped default bundle).
    ``threads``: onnxruntime intra-op threads.  ``fp32``: run
    ``model_fp32.onnx`` instead of the INT8 model (full export dirs only).
    """

    name = "bert"
    #: τ_r is measured by profiling, not assumed here.
    tau_r = None

    def __init__(
        self,
        bundle: str | Path | None = None,
        threads: int = 1,
        *,
        fp32: bool = False,
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        if not isinstance(threads, int) or threads < 1:
            raise RouterError(f"threads must be a positive integer, got {threads!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise RouterError(f"batch_size must be a positive integer, got {batch_size!r}")
        try:
            self.bundle: Bundle = load_bundle(bundle)
        except BundleError as exc:
            raise RouterError(str(exc)) from exc
        self.manifest = self.bundle.manifest
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(self.bundle.tokenizer_path)
        self._pad_id = pad_id_of(self.tokenizer)
        model_path = self.bundle.fp32_model_path if fp32 else self.bundle.model_path
        if not model_path.is_file():
            raise RouterError(f"bundle {str(self.bundle.directory)!r} lacks {model_path.name}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise RouterError(f"cannot load {str(model_path)!r}: {exc}") from exc
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if set(graph_inputs) != set(self.manifest.inputs):
            raise RouterError(
                f"{model_path.name} takes inputs {graph_inputs}, the manifest says {list(self.manifest.inputs)}"
            )
        self._output = self.session.get_outputs()[0].name

    # --- scoring -------------------------------------------------------------

    def encode(self, prompt: str, context: Sequence[Message] = ()):
        """The exact token sequence the model sees for this turn."""
        if not isinstance(prompt, str):
            raise RouterError(f"prompt must be a string, got {type(prompt).__name__}")
        return encode_turn(self.tokenizer, prompt, list(context or ()), self.manifest.max_length)

    def feeds(self, turns: Sequence[tuple[str, Sequence[Message]]], encodings=None):
        """onnxruntime feeds for a batch of turns (also used by the benchmark)."""
        import numpy as np

        encs = encodings if encodings is not None else [self.encode(p, c) for p, c in turns]
        arrays = batch_arrays(encs, self._pad_id)
        feeds = {k: arrays[k] for k in self.manifest.inputs if k in arrays}
        if "lp" in self.manifest.inputs:
            lp = self.manifest.lp_feature
            feeds["lp"] = np.asarray([[lp.value(p)] for p, _ in turns], dtype=np.float32)
        return feeds

    def _run(self, turns: Sequence[tuple[str, Sequence[Message]]], encodings=None) -> list[float]:
        out = self.session.run([self._output], self.feeds(turns, encodings))[0]
        return [float(v) for v in out.reshape(-1)]

    def score(self, prompt: str, context: Sequence[Message] = ()) -> float:
        return self._run([(prompt, context)])[0]

    def score_batch(self, items: Iterable[tuple[str, Sequence[Message]]]) -> list[float]:
        """Scores in input order; batches are formed from turns of similar length."""
        turns = [(p, tuple(c or ())) for p, c in items]
        if not turns:
            return []
        encs = [self.encode(p, c) for p, c in turns]
        order = sorted(range(len(turns)), key=lambda i: len(encs[i].ids))
        scores: list[float] = [0.0] * len(turns)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, p in zip(idx, self._run([turns[i] for i in idx], [encs[i] for i in idx])):
                scores[i] = p
        return scores
