"""ONNX Runtime backend: a tokenizer.json tokenizer, an ONNX graph of the transformer, the rest in numpy.

Never imports torch: a missing ONNX file is exported by a subprocess (:func:`akidb_embed.models.onnx_path`;
BERT-style encoders, Qwen3 decoders and Gemma3 text models). Pooling (mean, cls, max, lasttoken), Dense
layers and normalization follow the model's ``modules.json`` so vectors match sentence-transformers.
Texts are padded on the right; last-token pooling takes each row's last real token.

Options (all optional): ``threads`` (intra-op, default: CPUs available to the process),
``inter_op_threads`` (1), ``spin`` (True: ORT threads spin-wait inside a pass and stop when it ends,
leaving the cores to the supervisor and the clients between passes; "always": they spin between passes
too; False: they never spin), ``providers``
(["CPUExecutionProvider"]; unavailable ones are dropped with
a warning), ``graph_optimization`` ("all" | "extended" | "basic" | "disable"), ``quantize``
(None | "int8"), ``max_seq_length`` (default from sentence_bert_config.json), ``cache_dir``,
``allow_download`` (True); prompts and dimensions: see :mod:`akidb_embed.workers.request_options`.
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
        self._encoder: models.TextEncoder | None = None

    # ------------------------------------------------------------ load

    def load(self) -> ModelInfo:
        try:
            import onnxruntime as ort
            import tokenizers  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(
                f"onnxruntime is not installed: pip install onnxruntime tokenizers ({exc})") from exc
        opts = self.options
        model_dir = self.resolve_model_dir()
        try:
            self._config = models.read_sentence_config(model_dir)
            self.max_tokens = int(opts.get("max_seq_length") or self._config.max_seq_length)
            self._encoder = models.TextEncoder(model_dir, self.max_tokens, self._config.do_lower_case)
            self._pad_id = models.pad_id(self._encoder.tokenizer, model_dir)
            self._pipeline = models.Pipeline(model_dir, self._config)
            self._onnx_file = models.onnx_path(model_dir, quantize=opts.get("quantize"),
                                               cache_dir=opts.get("cache_dir"))
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise BackendUnavailable(f"cannot prepare ONNX model {self.model!r} from {model_dir}: {exc}") from exc
        self._session = self._make_session(ort)
        self._inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = "last_hidden_state" if "last_hidden_state" in outputs else outputs[0]
        self.enforce_cache_limit()
        dim = int(self.embed(["warm-up"]).vectors.shape[1])
        return ModelInfo(model=self.model, dim=dim, max_tokens=self.max_tokens, extra={
            "path": str(model_dir), "onnx_file": str(self._onnx_file),
            "providers": self._session.get_providers(), "threads": self._threads,
            **models.describe(self._config), "padding_side": "right",
            "quantization": opts.get("quantize"), "quantize": opts.get("quantize"),
            "revision": models.weights_revision(model_dir, self.options.get("cache_dir"))},
            prompts=self._config.prompts, default_prompt_name=self._config.default_prompt_name,
            matryoshka_dims=self._config.matryoshka_dims)

    def _make_session(self, ort: Any) -> Any:
        opts = self.options
        so = ort.SessionOptions()
        self._threads = int(opts.get("threads") or available_cpus())
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = int(opts.get("inter_op_threads") or 1)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = opts.get("spin", True)
        if spin == "always":   # threads keep spinning between passes too: ~0.25 ms faster per lone short text
            pass
        elif spin:
            # Intra-op threads spin-wait between the operators of a pass (fast), and stop spinning when the
            # pass returns: between passes the cores go to the supervisor and the clients, which share them.
            # Measured on 2 cores with an ingest and searches running, threads left spinning between passes
            # kept searches waiting for a core (p99 89-107 ms instead of ~30) and the ingest 15 % slower.
            so.add_session_config_entry("session.force_spinning_stop", "1")
        else:   # idle threads sleep even inside a pass: ~0.4 ms slower per short text, 15 % for one client
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

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        if self._encoder is None:
            return super().token_counts(texts)
        return self._encoder.counts(texts)

    def embed(self, texts: Sequence[str], truncate: str = "end") -> EmbedOutput:
        n = len(texts)
        if n == 0:
            return EmbedOutput(np.zeros((0, 0), dtype=np.float32), 0)
        if self._encoder is None:
            raise RuntimeError("embed() before load()")
        ids, mask, types, cut = models.pad_batch(self._encoder.encode(texts, truncate), self._pad_id)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self._session.run([self._output], {k: feeds[k] for k in self._inputs})[0]
        return EmbedOutput(self._pipeline(hidden, mask), sum(cut), cut)

    def close(self) -> None:
        self._session = None
        self._encoder = None
        super().close()
