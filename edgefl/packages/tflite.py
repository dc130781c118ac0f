"""Package builder for LiteRT (TFLite) models exported with on-device training signatures.

TensorFlow's on-device training guide bakes forward, loss, backward and optimizer into the
model's ``train`` signature, so unlike ONNX there is nothing to derive here: this module checks
that the model keeps the contract edgefl relies on (docs/litert-training.md), reads the initial
weights through ``save()`` and describes everything in the manifest, so a device (or a C client)
knows which signature and tensor names to call without opening the flatbuffer itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefl.packages.artifacts import TrainingArtifacts

SIGNATURES = ("train", "infer", "save", "restore")
METADATA_NAME = "edgefl_training"
LOSSES = ("cross_entropy",)
INFER_OUTPUTS = {"logits": "logits", "output": "probabilities", "probabilities": "probabilities"}


def _interpreter(model: bytes) -> Any:
    """Load ``model`` with ai-edge-litert, else tflite-runtime (the device trainer's choice)."""
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError:
        try:
            from tflite_runtime import interpreter as litert
        except ImportError as exc:
            raise ImportError(
                "building a LiteRT package needs a TFLite interpreter: pip install ai-edge-litert"
            ) from exc
    try:
        return litert.Interpreter(
            model_content=model,
            experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"not a loadable TFLite model: {exc}") from exc


def read_metadata(model: bytes) -> dict[str, Any] | None:
    """The ``edgefl_training`` JSON that tools/build_tflite_model.py embeds, or None.

    It records the loss and optimizer baked into the train signature, which the graph's tensor
    names alone cannot tell. None when the model has none or no flatbuffer schema is installed.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    root = schema.Model.GetRootAs(model, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() != METADATA_NAME.encode():
            continue
        buf = root.Buffers(entry.Buffer())
        if buf.Offset() > 1:  # stored after the flatbuffer (models over 2 GB)
            raw = model[buf.Offset() : buf.Offset() + buf.Size()]
        else:
            raw = buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
        try:
            meta = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"TFLite metadata {METADATA_NAME!r} is not JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"TFLite metadata {METADATA_NAME!r} is not a JSON object")
        return meta
    return None


def _spec(name: str, detail: Mapping[str, Any], *, dynamic: bool) -> dict[str, Any]:
    shape = detail["shape_signature"] if dynamic else detail["shape"]
    return {"name": name, "dtype": np.dtype(detail["dtype"]).name, "shape": [int(d) for d in shape]}


def _resolve_optimizer(
    meta: dict[str, Any] | None, optimizer: Mapping[str, Any] | None, has_lr_input: bool
) -> dict[str, Any]:
    baked = dict(meta.get("optimizer") or {}) if meta else {}
    if optimizer is None:
        if not baked:
            raise ValueError(
                "the model carries no edgefl_training metadata, so its optimizer is unknown: "
                "pass optimizer={'name': ..., 'lr': ...} describing its train signature"
            )
        return baked
    given = dict(optimizer)
    if baked:
        if given.get("name", baked.get("name")) != baked.get("name"):
            raise ValueError(
                f"optimizer {given.get('name')!r} was asked for, but the model's train signature "
                f"applies {baked.get('name')!r}: a TFLite model's update rule is baked in"
            )
        if not has_lr_input and "lr" in given and given["lr"] != baked.get("lr"):
            raise ValueError(
                f"lr {given['lr']} was asked for, but the model's learning rate is fixed at "
                f"{baked.get('lr')} (its train signature has no lr input)"
            )
        given = {**baked, **given}
    if "name" not in given:
        raise ValueError("optimizer needs a 'name' (e.g. 'sgd')")
    return given


def _trial_step(
    runners: Mapping[str, Any], train_in: Mapping[str, Any], initial: Mapping[str, np.ndarray]
) -> None:
    """Run ``train`` and ``infer`` once on a one-sample zero batch, then put the initial
    weights back: an op this interpreter lacks (a Flex op from ``SELECT_TF_OPS``, say) only
    shows when a signature is prepared, and it must fail here rather than on every device."""
    x_detail = train_in["x"]
    shape = [1] + [int(d) if int(d) > 0 else 1 for d in x_detail["shape_signature"][1:]]
    feed = {
        "x": np.zeros(shape, dtype=x_detail["dtype"]),
        "y": np.zeros([1], dtype=train_in["y"]["dtype"]),
    }
    if "lr" in train_in:
        feed["lr"] = np.zeros([], dtype=train_in["lr"]["dtype"])
    try:
        loss = np.asarray(runners["train"](**feed)["loss"])
        runners["infer"](x=feed["x"])
    except RuntimeError as exc:
        raise ValueError(
            f"the model does not run on a stock TFLite interpreter (edgefl needs builtin ops "
            f"only, no SELECT_TF_OPS): {exc}"
        ) from exc
    finally:
        runners["restore"](**initial)
    if loss.size != 1 or not np.isfinite(loss).all():
        raise ValueError(f"signature 'train' must output a finite scalar 'loss'; got {loss!r}")


def build_tflite_training(
    model: bytes | str | Path,
    *,
    loss: str = "cross_entropy",
    optimizer: Mapping[str, Any] | None = None,
    trainable: Sequence[str] | None = None,
) -> TrainingArtifacts:
    """Check a trainable .tflite model and describe it for a device.

    Refuses (``ValueError`` naming the reason) a model that lacks one of the ``train``,
    ``infer``, ``save``, ``restore`` signatures, whose ``train`` is not ``(x, y[, lr]) ->
    {loss}`` with a dynamic batch dimension, or whose ``save`` outputs and ``restore`` inputs
    differ, or that does not run here (it takes one trial step on a zero batch, which catches
    Flex ops). ``loss`` and ``optimizer`` must agree with the model's edgefl metadata when it has
    some (the update rule is baked into the graph; only a runtime ``lr`` input can change the
    rate); ``trainable`` picks the variables that are federated (default: all ``save`` outputs).
    """
    data = (
        bytes(model)
        if isinstance(model, (bytes, bytearray, memoryview))
        else Path(model).read_bytes()
    )
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not supported for LiteRT models; choose {LOSSES}")
    interp = _interpreter(data)
    sigs = interp.get_signature_list()
    missing = [s for s in SIGNATURES if s not in sigs]
    if missing:
        raise ValueError(
            f"TFLite model lacks the {', '.join(repr(m) for m in missing)} signature"
            f"{'s' if len(missing) > 1 else ''}; edgefl needs train, infer, save and restore "
            f"(it has {sorted(sigs)}; see docs/litert-training.md)"
        )
    runners = {s: interp.get_signature_runner(s) for s in SIGNATURES}
    ins = {s: runners[s].get_input_details() for s in SIGNATURES}
    outs = {s: runners[s].get_output_details() for s in SIGNATURES}

    train_in = ins["train"]
    absent = [k for k in ("x", "y") if k not in train_in]
    extra = sorted(set(train_in) - {"x", "y", "lr"})
    if absent or extra:
        raise ValueError(
            f"signature 'train' must take inputs x, y and optionally lr; it takes "
            f"{sorted(train_in)}"
        )
    if "loss" not in outs["train"]:
        raise ValueError(
            f"signature 'train' must output 'loss'; it outputs {sorted(outs['train'])}"
        )
    for k in ("x", "y"):
        if int(train_in[k]["shape_signature"][0]) != -1:
            raise ValueError(
                f"signature 'train' input {k!r} has a fixed batch dimension "
                f"{list(train_in[k]['shape_signature'])}; edgefl feeds partial last batches, so "
                "export it with input_signature batch None"
            )
    if "lr" in train_in and len(train_in["lr"]["shape_signature"]) != 0:
        raise ValueError("signature 'train' input 'lr' must be a scalar")
    if not np.issubdtype(np.dtype(train_in["y"]["dtype"]), np.integer):
        raise ValueError("signature 'train' input 'y' must hold integer class labels")

    if list(ins["infer"]) != ["x"]:
        raise ValueError(
            f"signature 'infer' must take one input 'x'; it takes {sorted(ins['infer'])}"
        )
    x_train, x_infer = (
        _spec("x", train_in["x"], dynamic=True),
        _spec("x", ins["infer"]["x"], dynamic=True),
    )
    if x_train != x_infer:
        raise ValueError(f"'train' and 'infer' disagree on input x: {x_train} vs {x_infer}")
    out_name = next((k for k in INFER_OUTPUTS if k in outs["infer"]), None)
    if out_name is None:
        raise ValueError(
            f"signature 'infer' must output 'logits' (or 'output'/'probabilities'); it outputs "
            f"{sorted(outs['infer'])}"
        )
    num_classes = int(outs["infer"][out_name]["shape_signature"][-1])

    if ins["save"]:
        raise ValueError(f"signature 'save' must take no inputs; it takes {sorted(ins['save'])}")
    if set(outs["save"]) != set(ins["restore"]):
        raise ValueError(
            f"'save' outputs {sorted(outs['save'])} and 'restore' inputs "
            f"{sorted(ins['restore'])} must name the same variables"
        )
    initial = {k: np.array(v, copy=True) for k, v in runners["save"]().items()}
    for name, detail in ins["restore"].items():
        want = (np.dtype(detail["dtype"]), tuple(int(d) for d in detail["shape_signature"]))
        if (initial[name].dtype, initial[name].shape) != want:
            raise ValueError(
                f"variable {name!r}: save gives {initial[name].dtype}{list(initial[name].shape)}, "
                f"restore takes {want[0]}{list(want[1])}"
            )
    _trial_step(runners, train_in, initial)
    variables = sorted(initial)
    params = variables if trainable is None else list(trainable)
    unknown = sorted(set(params) - set(variables))
    if unknown or not params:
        raise ValueError(
            f"trainable {unknown or params} not among the model's variables {variables}"
        )

    meta = read_metadata(data)
    if meta and meta.get("loss", loss) != loss:
        raise ValueError(
            f"loss {loss!r} was asked for, but the model is trained on {meta['loss']!r}"
        )
    opt = _resolve_optimizer(meta, optimizer, "lr" in train_in)

    manifest: dict[str, Any] = {
        "parameters": [
            {"name": p, "dtype": initial[p].dtype.name, "shape": list(initial[p].shape)}
            for p in params
        ],
        "inputs": [x_train],
        "labels": _spec("y", train_in["y"], dynamic=True),
        "loss": loss,
        "optimizer": opt,
        "training": {
            "signatures": {
                s: {"name": s, "inputs": sorted(ins[s]), "outputs": sorted(outs[s])}
                for s in SIGNATURES
            },
            "train_inputs": {"x": "x", "y": "y", "lr": "lr" if "lr" in train_in else None},
            "lr_dtype": np.dtype(train_in["lr"]["dtype"]).name if "lr" in train_in else None,
            "loss_output": "loss",
            "infer_input": "x",
            "infer_output": out_name,
            "infer_output_kind": INFER_OUTPUTS[out_name],
            "num_classes": num_classes,
            "variables": variables,
            "metadata": meta,
        },
    }
    return TrainingArtifacts(
        framework="tflite",
        files={"model.tflite": data},
        manifest=manifest,
        initial_weights={p: initial[p] for p in params},
    )
