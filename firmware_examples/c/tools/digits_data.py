"""Write a device's local data file (EFLD) for the C device, e.g. its digits partition.

EFLD v1, little-endian: the 4 bytes ``EFLD``, uint32 version (1), uint32 n (examples),
uint32 d (features); then X as n*d float64 in row-major order; then y as n int32 labels.
A real device writes its own readings in this layout; this script exports the canonical
digits task's partition so a C device can join a simulated session:

    python firmware_examples/c/tools/digits_data.py --devices 10 --index 3 dev-0003.efld
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np

MAGIC = b"EFLD"
VERSION = 1


def write_efld(path: Path, X: np.ndarray, y: np.ndarray) -> None:
    """Write standardised features ``X`` (n, d) and integer labels ``y`` (n,) as EFLD v1."""
    X = np.ascontiguousarray(X, dtype="<f8")
    y = np.ascontiguousarray(y, dtype="<i4")
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be (n, d) and y (n,), not {X.shape} and {y.shape}")
    with Path(path).open("wb") as f:
        f.write(MAGIC + struct.pack("<III", VERSION, X.shape[0], X.shape[1]))
        f.write(X.tobytes())
        f.write(y.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True, help="fleet size of the partition")
    parser.add_argument("--index", type=int, required=True, help="this device's index k")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    from edgefl.tasks import digits

    X, y = digits.device_data(args.devices, args.index)
    write_efld(args.out, X, y)
    print(f"{args.out}: {len(y)} examples of {X.shape[1]} features (seed index {args.index})")


if __name__ == "__main__":
    main()
