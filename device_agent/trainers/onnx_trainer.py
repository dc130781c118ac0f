"""Train an ONNX model package on the device with plain ``onnxruntime``.

The package carries a training-step graph (forward, loss, backward, optimizer update; built by
``edgefl.packages.onnx_autodiff`` at packaging time) and an eval graph. This trainer only feeds
them: no torch, no ``onnx`` package, no onnxruntime-training. The minibatch loop is the digits
protocol's, so a float64 softmax package reproduces the numpy reference trainer.
onnxruntime is imported when a trainer is built, never at module import, to keep an idle agent
small.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Tuple

import numpy as np

from device_agent.trainers.base import TrainResult, TrainTask, proximal_mu
from device_agent.trainers.data import check_local_data
from edgefl.models.numpy_models import minibatches
from edgefl.protocol.types import Weights

_DTYPES: Dict[str, Any] = {"float32": np.float32, "float64": np.float64, "int64": np.int64}
EVAL_CHUNK = 1024  # rows per eval-graph call: bounds the activations' memory


def _session(model: bytes, threads: int, float64: bool) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if float64:  # extended optimizations fuse into com.microsoft ops that older onnxruntime
        # releases (1.19, the last for Python 3.9) implement for float32 only
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _fmt(shape: Any) -> str:
    dims = tuple(int(d) if isinstance(d, int) else -1 for d in shape)
    return str(dims)


def _fit_data(spec: Mapping[str, Any], X: np.ndarray) -> np.ndarray:
    """Cast and reshape local data to the package's input; refuse data that cannot fit."""
    want = [d if isinstance(d, int) and d > 0 else -1 for d in spec["shape"][1:]]
    have = tuple(X.shape[1:])
    mismatch = ValueError(
        f"package input {spec['name']!r} expects {_fmt([-1, *want])}, "
        f"device data has {tuple(X.shape)}"
    )
    if X.ndim == 0:
        raise mismatch
    if len(want) == len(have) and all(w in (-1, h) for w, h in zip(want, have)):
        return np.ascontiguousarray(X, dtype=_DTYPES[spec["dtype"]])
    if -1 in want or int(np.prod(want)) != int(np.prod(have)):
        raise mismatch
    return np.ascontiguousarray(X.reshape((len(X), *want)), dtype=_DTYPES[spec["dtype"]])


class OnnxTrainer:
    """A ``Trainer`` over an ONNX training package (``manifest`` + ``files``) and local data.

    Sessions are created once here, so a round costs only the graph runs. Optimizer state
    (momentum, Adam moments, step) lives for one ``train`` call: it is reset every round and
    never leaves the device.
    """

    def __init__(
        self,
        manifest: Mapping[str, Any],
        files: Mapping[str, bytes],
        X: np.ndarray,
        y: np.ndarray,
        *,
        threads: int = 1,
    ) -> None:
        try:
            self.training: Mapping[str, Any] = manifest["training"]
            self.params: List[Mapping[str, Any]] = list(manifest["parameters"])
            self.loss: str = manifest["loss"]
            self.lr_default = float(manifest["optimizer"]["lr"])
            self.optimizer = str(manifest["optimizer"].get("name", "sgd"))
            data_spec, label_spec = manifest["inputs"][0], manifest["labels"]
            train_file, eval_file = self.training["train_step"], self.training["eval"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"not an ONNX training manifest: missing {exc}") from exc
        for name in (train_file, eval_file):
            if name not in files:
                raise ValueError(f"package lacks file {name!r} named by its manifest")
        X, y = check_local_data(X, y, allow_empty=False, who="OnnxTrainer")
        self.X = _fit_data(data_spec, X)
        self.dtype = _DTYPES[self.params[0]["dtype"]]
        self.y = self._fit_labels(label_spec, y)
        float64 = self.dtype == np.float64
        self._train = _session(files[train_file], threads, float64)
        self._eval = _session(files[eval_file], threads, float64)

    @classmethod
    def from_package(
        cls,
        package: Any,
        X: np.ndarray,
        y: np.ndarray,
        *,
        threads: int = 1,
    ) -> OnnxTrainer:
        """Build from any package object with ``.manifest`` and ``.files``."""
        return cls(package.manifest, package.files, X, y, threads=threads)

    def _fit_labels(self, spec: Mapping[str, Any], y: np.ndarray) -> np.ndarray:
        if self.loss == "cross_entropy":
            if y.ndim != 1 or not np.all(np.equal(np.mod(y, 1), 0)):
                raise ValueError(f"cross_entropy needs 1-D integer labels, got {y.dtype} {y.shape}")
            classes = self.training.get("classes")
            if classes is not None and (y.min() < 0 or y.max() >= classes):
                raise ValueError(f"labels must lie in [0, {classes}), got {y.min()}..{y.max()}")
            return np.ascontiguousarray(y, dtype=np.int64)
        want = [d if isinstance(d, int) and d > 0 else -1 for d in spec["shape"][1:]]
        return np.ascontiguousarray(y.reshape((len(y), *want)), dtype=self.dtype)

    def _feeds(self, weights: Weights) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """Weights cast to the model dtype, and the incoming dtypes to return them in."""
        names = [p["name"] for p in self.params]
        if set(weights) != set(names):
            raise ValueError(
                f"weights {sorted(weights)} do not match the package parameters {sorted(names)}"
            )
        feeds, dtypes = {}, {}
        for p in self.params:
            w = np.asarray(weights[p["name"]])
            if list(w.shape) != list(p["shape"]):
                raise ValueError(
                    f"weight {p['name']!r} has shape {w.shape}, the package expects {p['shape']}"
                )
            feeds[p["name"]] = np.ascontiguousarray(w, dtype=self.dtype)
            dtypes[p["name"]] = w.dtype
        return feeds, dtypes

    def train(self, weights: Weights, task: TrainTask) -> TrainResult:
        """Minibatch training as the digits protocol fixes it, then metrics on the local data."""
        cfg, tr = task.config, self.training
        lr = np.array(float(cfg.get("lr", self.lr_default)), dtype=self.dtype)
        batch_size, epochs = int(cfg.get("batch_size", 32)), int(cfg.get("epochs", 1))
        if batch_size < 1 or epochs < 0:
            raise ValueError(f"bad training settings: batch_size={batch_size}, epochs={epochs}")
        params, dtypes = self._feeds(weights)
        mu = proximal_mu(cfg)
        if mu > 0 and (self.optimizer != "sgd" or tr["state"]):
            raise ValueError(
                f"this ONNX package trains with {self.optimizer!r}, whose state would absorb "
                f"FedProx's proximal term (mu={mu}); only plain-SGD packages can apply it"
            )
        anchor = {k: v.copy() for k, v in params.items()} if mu > 0 else {}
        state = {
            s["input"]: np.full(s["shape"], s["init"], dtype=_DTYPES[s["dtype"]])
            for s in tr["state"]
        }
        p_io = [(p["input"], p["output"]) for p in tr["params"]]
        s_io = [(s["input"], s["output"]) for s in tr["state"]]
        outputs = [o for _, o in p_io] + [o for _, o in s_io]
        n = len(self.y)
        batches = minibatches(
            n, seed=task.seed, round_=task.round, batch_size=batch_size, epochs=epochs
        )
        for idx in batches:
            feeds = {tr["data_input"]: self.X[idx], tr["label_input"]: self.y[idx]}
            feeds[tr["lr_input"]] = lr
            feeds.update(params)
            feeds.update(state)
            got = self._train.run(outputs, feeds)
            stepped = {i: v for (i, _), v in zip(p_io, got)}
            if mu > 0:  # SGD on the proximal gradient: w - lr*g - lr*mu*(w - w_global)
                for name, w in stepped.items():
                    w -= lr * (mu * (params[name] - anchor[name])).astype(self.dtype)
            params = stepped
            state = {i: v for (i, _), v in zip(s_io, got[len(p_io) :])}
        new = {name: params[name].astype(dtypes[name], copy=False) for name in dtypes}
        metrics = {f"train_{k}": v for k, v in self._evaluate(params).items()}
        return TrainResult(new, n, metrics)

    def evaluate(self, weights: Weights) -> Dict[str, float]:
        """Mean loss (and accuracy for classifiers) of ``weights`` on the local data."""
        return self._evaluate(self._feeds(weights)[0])

    def _evaluate(self, params: Mapping[str, np.ndarray]) -> Dict[str, float]:
        tr = self.training
        outputs = [tr["eval_loss_output"], tr["eval_logits_output"]]
        loss_sum, correct, n = 0.0, 0, len(self.y)
        for s in range(0, n, EVAL_CHUNK):
            feeds = {tr["data_input"]: self.X[s : s + EVAL_CHUNK]}
            feeds[tr["eval_label_input"]] = self.y[s : s + EVAL_CHUNK]
            feeds.update(params)
            loss, logits = self._eval.run(outputs, feeds)
            rows = len(logits)
            loss_sum += float(loss) * rows
            if self.loss == "cross_entropy":
                correct += int(np.sum(np.argmax(logits, axis=1) == self.y[s : s + EVAL_CHUNK]))
        out = {"loss": loss_sum / n}
        if self.loss == "cross_entropy":
            out["accuracy"] = correct / n
        return out
