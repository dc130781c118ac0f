"""Export the digits MLP and CNN with torch into edgefl/packages/models/ (run on a workstation).

    .venv/bin/python tools/export_digits_models.py

Only this script needs torch; the product loads the committed .onnx files. The MLP takes its
initial weights from the numpy reference (``init_weights("mlp", 64, 10, seed=0)``) under the
same names, so the numpy evaluator also scores it; the CNN uses torch's seeded init.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefl.models.numpy_models import init_weights  # noqa: E402

OUT = ROOT / "edgefl" / "packages" / "models"
OPSET = 17  # onnxruntime >= 1.13 runs it


class DigitsMLP(torch.nn.Module):
    """``relu(x @ W1 + b1) @ W2 + b2``: exports as MatMul/Add/Relu with the numpy names."""

    def __init__(self) -> None:
        super().__init__()
        for name, value in init_weights("mlp", 64, 10, seed=0).items():
            setattr(self, name, torch.nn.Parameter(torch.tensor(value, dtype=torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W1 + self.b1) @ self.W2 + self.b2


class DigitsCNN(torch.nn.Module):
    """Conv 3x3 (1->8, pad 1) -> Relu -> MaxPool 2 -> Flatten -> Linear 128->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def export(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """Legacy (TorchScript) exporter: it needs no onnxscript and names initializers after the
    module's parameters."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            (example,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    models = {
        "digits_mlp.onnx": export(DigitsMLP(), torch.zeros(2, 64)),
        "digits_cnn.onnx": export(DigitsCNN(), torch.zeros(2, 1, 8, 8)),
    }
    for name, data in models.items():
        (OUT / name).write_bytes(data)
        print(f"wrote {OUT / name} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
