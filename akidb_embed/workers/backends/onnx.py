"""ONNX Runtime backend: a tokenizer.json tokenizer, an ONNX encoder, pooling in numpy.

Never imports torch: a missing ONNX file is exported by a subprocess (:func:`akidb_embed.models.onnx_path`).
Pooling and normalization follow the model's ``modules.json`` so vectors match sentence-transformers.

Options (all optional): ``threads`` (intra-op, default: CPUs available to the process),
``inter_op_threads`` (1), ``spin`` (True: idle ORT threads spin-wait; false frees the cores between batches), ``providers`` (["CPUExecutionProvider"]; unavailable ones are dropped with
a warning), ``graph_optimization`` ("all" | "extended" | "basic" | "disable"), ``quantize``
(None | "int8"), ``max_seq_length`` (default from sentence_bert_config.json), ``cache_dir``,
``allow_download`` (True).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from akidb_embed import models
from akidb_embed.protocol.errors import BackendUnavailable
from akidb_embed.workers.backends.base import Backend, EmbedOutput, ModelInfo

log = logging.getLogger(__name__)

_OPT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED",
               "basic": "ORT_ENABLE_BASIC", "disable": "ORT_DISABLE_ALL"}
_PENDING_LIMIT = 4096  # encodings kept from token_lengths() for the next embed()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class OnnxBackend(Backend):
    kind = "onnx"

    def __init__(self, model: str, options: Mapping[str, Any]) -> None:
        super().__init__(model, options)
        self._session: Any = None
        self._tokenizer: Any = None
        self._pending: dict[str, Any] = {}

    # ------------------------------------------------------------ load

    def load(self) -> ModelInfo:
        try:
            import onnxruntime as ort
            import tokenizers  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                f"onnxruntime is not installed: pip install onnxruntime tokenizers ({exc})") from exc
        opts = self.options
        model_dir = self._resolve()
        try:
            self._config = models.read_sentence_config(model_dir)
            self.max_tokens = int(opts.get("max_seq_length") or self._config.max_seq_length)
            self._tokenizer = models.load_tokenizer(model_dir, self.max_tokens)
            self._pad_id = models.pad_id(self._tokenizer, model_dir)
            self._onnx_file = models.onnx_path(model_dir, quantize=opts.get("quantize"),
                                               cache_dir=opts.get("cache_dir"))
        except (OSError, ValueError, RuntimeError) as exc:
            raise BackendUnavailable(f"cannot prepare ONNX model {self.model!r} from {model_dir}: {exc}") from exc
        self._session = self._make_session(ort)
        self._inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]
        dim = int(self.embed(["warm-up"]).vectors.shape[1])
        return ModelInfo(model=self.model, dim=dim, max_tokens=self.max_tokens, extra={
            "path": str(model_dir), "onnx_file": str(self._onnx_file),
            "providers": self._session.get_providers(), "threads": self._threads,
            "pooling": "+".join(self._config.pooling), "normalize": self._config.normalize,
            "quantize": opts.get("quantize")})

    def _resolve(self):  # -> Path
        try:
            return models.resolve_model(self.model, cache_dir=self.options.get("cache_dir"),
                                        allow_download=bool(self.options.get("allow_download", True)))
        except models.ModelNotFound as exc:
            raise BackendUnavailable(str(exc)) from exc

    def _make_session(self, ort: Any) -> Any:
        opts = self.options
        so = ort.SessionOptions()
        self._threads = int(opts.get("threads") or available_cpus())
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = int(opts.get("inter_op_threads") or 1)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not opts.get("spin", True):
            # Idle intra-op threads sleep instead of spin-waiting: leaves the cores to other processes
            # between batches, at some latency cost (measured: spinning was faster on an idle 2-core box).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        level = str(opts.get("graph_optimization", "all")).lower()
        if level not in _OPT_LEVELS:
            raise BackendUnavailable(f"graph_optimization must be one of {sorted(_OPT_LEVELS)}, not {level!r}")
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level])
        try:
            return ort.InferenceSession(str(self._onnx_file), sess_options=so,
                                        providers=self._providers(ort))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendUnavailable(f"onnxruntime cannot load {self._onnx_file}: {exc}") from exc

    def _providers(self, ort: Any) -> list[str]:
        requested = list(self.options.get("providers") or ["CPUExecutionProvider"])
        available = set(ort.get_available_providers())
        chosen = [p for p in requested if p in available]
        for missing in (p for p in requested if p not in available):
            log.warning("onnxruntime provider %s is not available (have %s); skipping it",
                        missing, sorted(available))
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen

    # ------------------------------------------------------------ embed

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        """Encodings (truncated, unpadded), reusing those made by the last ``token_lengths``."""
        pending = self._pending
        if pending:
            found = [pending.get(t) for t in texts]
            if all(e is not None for e in found):
                for t in texts:
                    pending.pop(t, None)
                return found
        prepared = [t.lower() for t in texts] if self._config.do_lower_case else list(texts)
        return self._tokenizer.encode_batch(prepared)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        if self._tokenizer is None:
            return super().token_lengths(texts)
        if len(self._pending) > _PENDING_LIMIT:
            self._pending.clear()
        prepared = [t.lower() for t in texts] if self._config.do_lower_case else list(texts)
        encodings = self._tokenizer.encode_batch(prepared)
        self._pending.update(zip(texts, encodings))
        return [len(e.ids) for e in encodings]

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        n = len(texts)
        if n == 0:
            return EmbedOutput(np.zeros((0, 0), dtype=np.float32), 0)
        ids, mask, types, cut = models.pad_batch(self._encode(texts), self._pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self._session.run([self._output], {k: feeds[k] for k in self._inputs})[0]
        vectors = models.pool(hidden, mask, self._config.pooling, self._config.normalize)
        return EmbedOutput(vectors, sum(cut), cut)

    def close(self) -> None:
        self._session = None
        self._pending.clear()
