"""The edgefl model package: one CBOR file with a manifest, the model's files and a signature.

A device fetches a package, checks it completely (format tag and version, manifest fields,
every file's SHA-256, optionally an Ed25519 signature by a trusted key) and only then uses it.
The byte layout is specified in ``docs/model-package.md`` so that a C or MicroPython client
can read and verify a package without this module.

Device-side module: imports only cbor2, hashlib and numpy (plus ``cryptography`` lazily, when
a signature is made or checked) and runs on Python 3.9.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Union

import cbor2
import numpy as np

from edgefl.protocol.tensors import DTYPE_TO_TAG, CodecError, dumps_tensors, loads_tensors

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from edgefl.packages.artifacts import TrainingArtifacts

FORMAT_TAG = "edgefl-model-package"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
FRAMEWORKS = ("onnx", "tflite")
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
WEIGHTS_FILE = "weights.cbor"
SIGNATURE_ALG = "ed25519"
# Domain separation: a package signature can never be replayed as a signature on other data.
SIGNATURE_CONTEXT = b"edgefl-model-package\x00"
KEY_ID_BYTES = 16
MAX_MANIFEST_DEPTH = 32

REQUIRED_MANIFEST_FIELDS = (
    "format_version",
    "name",
    "framework",
    "created",
    "parameters",
    "inputs",
    "labels",
    "loss",
    "optimizer",
    "preprocessing",
    "files",
    "weights",
    "training",
)
PREPROCESSING_STEPS = ("scale", "mean", "std", "description")

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# Python 3.9 evaluates module-level aliases at import: no `X | Y` here.
Manifest = dict[str, Any]
Shape = list[Union[int, str]]


class PackageError(ValueError):
    """A model package that must not be used; the message names the field, file or key."""


# ---------------------------------------------------------------------------------------------
# Small helpers shared by readers and writers


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256, the digest used for files and for whole packages."""
    return hashlib.sha256(data).hexdigest()


def key_id(public_key: bytes | Ed25519PublicKey) -> str:
    """A public key's id: hex of the first 16 bytes of SHA-256 over its raw 32 bytes.

    Short enough to print, long enough that two keys of one fleet never collide.
    """
    raw = _public_raw(public_key)
    return hashlib.sha256(raw).digest()[:KEY_ID_BYTES].hex()


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The deterministic CBOR encoding of a manifest: the exact bytes a signature covers.

    RFC 8949 section 4.2.1 core deterministic encoding (cbor2 ``canonical=True``): shortest
    integer and float forms, definite lengths, map keys sorted. The same manifest therefore
    always gives the same bytes, and the same package the same digest.
    """
    return cbor2.dumps(_plain(dict(manifest), "manifest"), canonical=True)


def utc_now() -> str:
    """The current time as the manifest's ``created`` text: RFC 3339, UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def signed_message(manifest_bytes: bytes) -> bytes:
    """What the Ed25519 signature is computed over: a fixed context string, then the manifest."""
    return SIGNATURE_CONTEXT + manifest_bytes


def _public_raw(public_key: bytes | Ed25519PublicKey) -> bytes:
    if isinstance(public_key, (bytes, bytearray)):
        raw = bytes(public_key)
    else:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        # Not public_bytes_raw(): that needs cryptography >= 40, older than some devices have.
        raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    if len(raw) != 32:
        raise PackageError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return raw


def _verify_ed25519(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError as exc:  # pragma: no cover - depends on the device's install
        raise PackageError(
            "checking a package signature needs the 'cryptography' package (pip install "
            "cryptography)"
        ) from exc
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _private_key(signing_key: bytes | Ed25519PrivateKey) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(signing_key, (bytes, bytearray)):
        if len(signing_key) != 32:
            raise PackageError(f"an Ed25519 private key seed has 32 bytes, got {len(signing_key)}")
        return Ed25519PrivateKey.from_private_bytes(bytes(signing_key))
    return signing_key


def _plain(value: Any, where: str) -> Any:
    """Turn builder output (tuples, numpy scalars and arrays) into JSON-like plain data."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise PackageError(f"{where}: map keys must be text, got {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise PackageError(
        f"{where}: {type(value).__name__} is not allowed in a manifest (only maps, arrays, "
        "text, numbers, booleans and null)"
    )


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Decoded manifests hold only JSON-like data: no tags, byte strings or other types.

    Nesting is limited, which also refuses cycles (CBOR value sharing, tags 28/29).
    """
    if depth > MAX_MANIFEST_DEPTH:
        raise PackageError(f"{where} is nested deeper than {MAX_MANIFEST_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise PackageError(f"{where}: map keys must be text, got {k!r}")
            _check_plain(v, f"{where}.{k}", depth + 1)
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", depth + 1)
        return
    raise PackageError(
        f"{where} holds a {type(value).__name__}; a manifest holds only maps, arrays, text, "
        "numbers, booleans and null"
    )


def _decode_one(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR data item, refusing truncation and trailing bytes."""
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except cbor2.CBORDecodeEOF as exc:
        raise PackageError(f"{what} is truncated: the CBOR data ends early ({exc})") from exc
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise PackageError(f"{what} is not a valid CBOR data item: {exc}") from exc
    extra = len(data) - fp.tell()
    if extra:
        raise PackageError(f"{what} has {extra} bytes of trailing data after its CBOR item")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that converts to a finite float (a CBOR bignum past 1e308 does not)."""
    try:
        return _is_num(value) and math.isfinite(value)
    except OverflowError:
        return False


# ---------------------------------------------------------------------------------------------
# Manifest validation


def _field(manifest: Mapping[str, Any], name: str) -> Any:
    if name not in manifest or manifest[name] is None:
        raise PackageError(f"manifest is missing required field '{name}'")
    return manifest[name]


def _text(manifest: Mapping[str, Any], name: str) -> str:
    value = _field(manifest, name)
    if not isinstance(value, str) or not value:
        raise PackageError(f"manifest field '{name}' must be non-empty text, got {value!r}")
    return value


def _check_shape(shape: Any, where: str, *, concrete: bool) -> None:
    if not isinstance(shape, list):
        raise PackageError(f"{where}.shape must be an array, got {shape!r}")
    for d in shape:
        if _is_int(d) and d >= (0 if concrete else -1):
            continue
        if not concrete and isinstance(d, str) and d:
            continue  # a symbolic dimension, e.g. the batch size "N"
        kind = "non-negative integers" if concrete else "integers >= -1 or names"
        raise PackageError(f"{where}.shape entries must be {kind}, got {shape!r}")


def _check_tensor_spec(spec: Any, where: str, *, concrete: bool) -> str:
    if not isinstance(spec, dict):
        raise PackageError(f"{where} must be a map with name, dtype and shape, got {spec!r}")
    for key in ("name", "dtype", "shape"):
        if key not in spec:
            raise PackageError(f"{where} is missing '{key}'")
    name = spec["name"]
    if not isinstance(name, str) or not name:
        raise PackageError(f"{where}.name must be non-empty text, got {name!r}")
    if not isinstance(spec["dtype"], str) or spec["dtype"] not in DTYPE_TO_TAG:
        raise PackageError(
            f"{where} ('{name}') has dtype {spec['dtype']!r}; supported: {sorted(DTYPE_TO_TAG)}"
        )
    _check_shape(spec["shape"], f"{where} ('{name}')", concrete=concrete)
    return name


def _check_preprocessing(pre: Any, inputs: list[dict[str, Any]]) -> None:
    if not isinstance(pre, dict):
        raise PackageError(f"manifest field 'preprocessing' must be a map, got {pre!r}")
    for key in pre:
        if key not in PREPROCESSING_STEPS and not key.startswith("x-"):
            raise PackageError(
                f"unsupported preprocessing step '{key}' (known: {', '.join(PREPROCESSING_STEPS)};"
                " informational keys start with 'x-')"
            )
    if "scale" in pre and not _is_finite(pre["scale"]):
        raise PackageError(f"preprocessing.scale must be a finite number, got {pre['scale']!r}")
    if "description" in pre and not isinstance(pre["description"], str):
        raise PackageError("preprocessing.description must be text")
    per_example = _example_size(inputs[0]["shape"]) if len(inputs) == 1 else None
    for key in ("mean", "std"):
        if key not in pre:
            continue
        value = pre[key]
        values = value if isinstance(value, list) else [value]
        if not values or not all(_is_finite(v) for v in values):
            raise PackageError(f"preprocessing.{key} must be a finite number or array of them")
        if key == "std" and any(v == 0 for v in values):
            raise PackageError("preprocessing.std must not contain zeros")
        if isinstance(value, list):
            if len(inputs) != 1:
                raise PackageError(f"preprocessing.{key} as an array needs exactly one input")
            if per_example is not None and len(value) != per_example:
                raise PackageError(
                    f"preprocessing.{key} has {len(value)} values, but input "
                    f"'{inputs[0]['name']}' has {per_example} features per example"
                )


def _example_size(shape: Shape) -> int | None:
    """Elements in one example (all dimensions but the first), or None if symbolic."""
    n = 1
    for d in shape[1:]:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            return None
        n *= d
    return n


def validate_manifest(manifest: Any) -> Manifest:
    """Check every field a device relies on; raise PackageError naming the first bad one."""
    if not isinstance(manifest, dict):
        raise PackageError(f"the manifest must be a CBOR map, got {type(manifest).__name__}")
    _check_plain(manifest, "manifest")
    for name in REQUIRED_MANIFEST_FIELDS:
        _field(manifest, name)
    version = manifest["format_version"]
    if not _is_int(version) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise PackageError(
            f"unsupported manifest format_version {version!r}; this reader supports "
            f"{', '.join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)}"
        )
    _text(manifest, "name")
    framework = _text(manifest, "framework")
    if framework not in FRAMEWORKS:
        raise PackageError(
            f"unsupported framework '{framework}'; supported: {', '.join(FRAMEWORKS)}"
        )
    _text(manifest, "created")
    _text(manifest, "loss")

    params = manifest["parameters"]
    if not isinstance(params, list) or not params:
        raise PackageError("manifest field 'parameters' must be a non-empty array")
    seen = set()
    for i, spec in enumerate(params):
        name = _check_tensor_spec(spec, f"parameters[{i}]", concrete=True)
        if name in seen:
            raise PackageError(f"parameter '{name}' is listed twice")
        seen.add(name)

    inputs = manifest["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise PackageError("manifest field 'inputs' must be a non-empty array")
    for i, spec in enumerate(inputs):
        _check_tensor_spec(spec, f"inputs[{i}]", concrete=False)
        if not spec["shape"]:
            raise PackageError(f"inputs[{i}] ('{spec['name']}') needs a batch dimension")
    _check_tensor_spec(manifest["labels"], "labels", concrete=False)
    labels = manifest["labels"]
    k = labels.get("num_classes")
    if k is not None and not (_is_int(k) and k > 0):
        raise PackageError(f"labels.num_classes must be a positive integer, got {k!r}")
    if "classes" in labels and not (
        isinstance(labels["classes"], list) and all(isinstance(c, str) for c in labels["classes"])
    ):
        raise PackageError("labels.classes must be an array of text")

    optimizer = manifest["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("name"), str):
        raise PackageError(
            f"manifest field 'optimizer' must be a map with a 'name', got {optimizer!r}"
        )
    if "lr" in optimizer and not _is_num(optimizer["lr"]):
        raise PackageError(f"optimizer.lr must be a number, got {optimizer['lr']!r}")
    if not isinstance(manifest["training"], dict):
        raise PackageError("manifest field 'training' must be a map")
    _check_preprocessing(manifest["preprocessing"], inputs)

    table = manifest["files"]
    if not isinstance(table, dict) or not table:
        raise PackageError("manifest field 'files' must be a non-empty map of file digests")
    for fname, entry in table.items():
        if not _FILE_NAME.fullmatch(fname):
            raise PackageError(
                f"file name {fname!r} is not allowed (letters, digits, '.', '_', '-'; "
                "no leading '.' or '/', at most 128 characters)"
            )
        if not isinstance(entry, dict):
            raise PackageError(f"files['{fname}'] must be a map with sha256 and size")
        if not isinstance(entry.get("sha256"), str) or not _SHA256_HEX.fullmatch(entry["sha256"]):
            raise PackageError(f"files['{fname}'].sha256 must be 64 lower-case hex digits")
        if not _is_int(entry.get("size")) or entry["size"] < 0:
            raise PackageError(f"files['{fname}'].size must be a non-negative integer")
    weights = _text(manifest, "weights")
    if weights not in table:
        raise PackageError(f"manifest field 'weights' names '{weights}', which is not in 'files'")
    return manifest


def _check_files(manifest: Manifest, files: Mapping[str, bytes]) -> None:
    table: dict[str, dict[str, Any]] = manifest["files"]
    for fname in sorted(table):
        if fname not in files:
            raise PackageError(
                f"file '{fname}' is listed in the manifest but absent from the package"
            )
    for fname in sorted(files):
        if fname not in table:
            raise PackageError(f"file '{fname}' is in the package but not listed in the manifest")
    for fname in sorted(table):
        data, entry = files[fname], table[fname]
        if len(data) != entry["size"]:
            raise PackageError(
                f"file '{fname}' does not match the manifest: {len(data)} bytes, expected "
                f"{entry['size']}"
            )
        digest = sha256_hex(data)
        if digest != entry["sha256"]:
            raise PackageError(
                f"file '{fname}' does not match its digest in the manifest: sha256 {digest}, "
                f"expected {entry['sha256']}"
            )


def _check_weights(manifest: Manifest, files: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    fname = manifest["weights"]
    try:
        weights = loads_tensors(files[fname])
    except CodecError as exc:
        raise PackageError(f"weights file '{fname}' is not a valid tensor set: {exc}") from exc
    specs = {p["name"]: p for p in manifest["parameters"]}
    missing = sorted(set(specs) - set(weights))
    extra = sorted(set(weights) - set(specs))
    if missing or extra:
        raise PackageError(
            f"weights file '{fname}' does not match 'parameters': missing {missing}, extra {extra}"
        )
    for name, arr in weights.items():
        spec = specs[name]
        if arr.dtype.name != spec["dtype"] or list(arr.shape) != spec["shape"]:
            raise PackageError(
                f"weights file '{fname}': tensor '{name}' is {arr.dtype.name} {list(arr.shape)}, "
                f"the manifest says {spec['dtype']} {spec['shape']}"
            )
    return weights


# ---------------------------------------------------------------------------------------------
# The package


class ModelPackage:
    """A model package in memory: manifest, files and (optionally) a signature.

    Build one with :meth:`from_artifacts` (workstation side) or :meth:`loads` / :meth:`read`
    (device side). A package returned by ``loads`` has passed every check in the docs; its
    ``verified_key_id`` says which trusted key signed it, or is None when no signature was
    checked.
    """

    def __init__(
        self,
        manifest: Mapping[str, Any],
        files: Mapping[str, bytes],
        signature: Mapping[str, Any] | None = None,
    ) -> None:
        self.manifest: Manifest = dict(manifest)
        self.files: dict[str, bytes] = dict(files)
        self.signature: dict[str, Any] | None = dict(signature) if signature else None
        self.verified_key_id: str | None = None
        self._signed_manifest: bytes | None = None  # the manifest bytes the signature covers
        self._encoded: bytes | None = None  # bytes as read or last written

    def __repr__(self) -> str:
        signed = self.signature["key_id"] if self.signature else "unsigned"
        return (
            f"ModelPackage(name={self.manifest.get('name')!r}, "
            f"framework={self.manifest.get('framework')!r}, files={sorted(self.files)}, "
            f"signature={signed})"
        )

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_artifacts(
        cls,
        artifacts: TrainingArtifacts,
        *,
        name: str,
        preprocessing: Mapping[str, Any] | None = None,
        created: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> ModelPackage:
        """Wrap a builder's artifacts: add format fields, initial weights and file digests.

        ``created`` is an RFC 3339 UTC time (``2026-11-05T10:00:00Z``, default: now);
        ``extra`` adds or overrides manifest fields (e.g. ``labels`` with ``num_classes``).
        The result is validated exactly as a device would validate it, so builder bugs surface here.
        """
        if artifacts.framework not in FRAMEWORKS:
            raise PackageError(
                f"unsupported framework '{artifacts.framework}'; supported: {', '.join(FRAMEWORKS)}"
            )
        if WEIGHTS_FILE in artifacts.files:
            raise PackageError(f"builder files must not use the reserved name '{WEIGHTS_FILE}'")
        manifest: Manifest = {
            k: v for k, v in artifacts.manifest.items() if k not in ("files", "weights")
        }
        manifest.update(
            format_version=FORMAT_VERSION,
            name=name,
            framework=artifacts.framework,
            created=created or utc_now(),
            preprocessing=dict(preprocessing or {}),
            weights=WEIGHTS_FILE,
        )
        manifest.update(extra or {})
        files = dict(artifacts.files)
        files[WEIGHTS_FILE] = dumps_tensors(artifacts.initial_weights)
        pkg = cls(_plain(manifest, "manifest"), files)
        pkg.refresh_files_table()
        pkg.validate()
        return pkg

    def refresh_files_table(self) -> None:
        """Recompute the manifest's ``files`` table (sha256 and size) from ``self.files``."""
        self.manifest["files"] = {
            fname: {"sha256": sha256_hex(data), "size": len(data)}
            for fname, data in sorted(self.files.items())
        }

    def validate(self) -> None:
        """Run the device's checks on this in-memory package (manifest, files, weights)."""
        validate_manifest(self.manifest)
        _check_files(self.manifest, self.files)
        _check_weights(self.manifest, self.files)

    def sign(self, signing_key: bytes | Ed25519PrivateKey) -> dict[str, Any]:
        """Sign the manifest (which holds every file's SHA-256) with an Ed25519 private key."""
        self.refresh_files_table()
        manifest_bytes = encode_manifest(self.manifest)
        key = _private_key(signing_key)
        sig = key.sign(signed_message(manifest_bytes))
        self.signature = {
            "alg": SIGNATURE_ALG,
            "key_id": key_id(key.public_key()),
            "sig": sig,
        }
        self._signed_manifest = manifest_bytes
        self.verified_key_id = None
        self._encoded = None
        return self.signature

    # -- encoding -----------------------------------------------------------------------------

    def dumps(self, signing_key: bytes | Ed25519PrivateKey | None = None) -> bytes:
        """Encode the package; sign it first when a key is given.

        An existing signature is kept only while the manifest is unchanged; a changed manifest
        with an old signature raises PackageError rather than writing a package that no
        device would accept.
        """
        if signing_key is not None:
            self.sign(signing_key)
        else:
            self.refresh_files_table()
        manifest_bytes = encode_manifest(self.manifest)
        if self.signature is not None:
            signed = self._signed_manifest
            if signed is None:
                raise PackageError("the package has a signature but not the bytes it covers")
            if signed != manifest_bytes:
                if cbor2.loads(signed) != self.manifest:
                    raise PackageError(
                        "the manifest changed after it was signed: sign it again "
                        "(signing_key=...) or drop the signature"
                    )
                manifest_bytes = signed  # same content, kept byte for byte
        self.validate()
        top: dict[str, Any] = {
            "format": FORMAT_TAG,
            "format_version": FORMAT_VERSION,
            "manifest": manifest_bytes,
        }
        if self.signature is not None:
            top["signature"] = {
                "alg": self.signature["alg"],
                "key_id": self.signature["key_id"],
                "sig": bytes(self.signature["sig"]),
            }
        top["files"] = {fname: bytes(self.files[fname]) for fname in sorted(self.files)}
        data: bytes = cbor2.dumps(top)
        self._encoded = data
        return data

    @property
    def digest(self) -> str:
        """SHA-256 hex of the encoded package: how controllers and devices name and cache it.

        The bytes are those last read, written or returned by ``dumps`` (encoded now if none
        yet); after changing ``manifest`` or ``files``, call ``dumps`` again.
        """
        data = self._encoded if self._encoded is not None else self.dumps()
        return sha256_hex(data)

    @property
    def size(self) -> int:
        """Bytes of the encoded package."""
        data = self._encoded if self._encoded is not None else self.dumps()
        return len(data)

    def write(
        self,
        path: str | os.PathLike[str],
        signing_key: bytes | Ed25519PrivateKey | None = None,
    ) -> str:
        """Write atomically (temp file, then rename); return the package digest."""
        data = self.dumps(signing_key)
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return sha256_hex(data)

    # -- decoding -----------------------------------------------------------------------------

    @classmethod
    def loads(
        cls,
        data: bytes,
        *,
        trusted_keys: Iterable[bytes | Ed25519PublicKey] | None = None,
        require_signature: bool = False,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> ModelPackage:
        """Decode and validate a package; nothing in it is usable before every check passed.

        ``trusted_keys``: public keys (raw 32 bytes or cryptography objects). When given, a
        signature must come from one of them and verify. ``require_signature`` refuses
        unsigned packages (and then needs ``trusted_keys``). Raises PackageError naming the
        problem.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PackageError(f"a package is bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > max_size:
            raise PackageError(f"package is {len(data)} bytes, over the limit of {max_size} bytes")
        if not data:
            raise PackageError("package is empty (0 bytes)")
        if data[0] >> 5 != 5:  # major type 5: a map. Catches ZIPs, ONNX files, JSON early.
            raise PackageError(
                "not an edgefl model package: it does not start with a CBOR map "
                f"(first byte 0x{data[0]:02x})"
            )
        top = _decode_one(data, "package")
        if not isinstance(top, dict):
            raise PackageError(f"not an edgefl model package: top level is a {type(top).__name__}")
        if top.get("format") != FORMAT_TAG:
            raise PackageError(
                f"not an edgefl model package: format is {top.get('format')!r}, expected "
                f"'{FORMAT_TAG}'"
            )
        version = top.get("format_version")
        if not _is_int(version) or version not in SUPPORTED_FORMAT_VERSIONS:
            raise PackageError(
                f"unsupported format_version {version!r}; this reader supports "
                f"{', '.join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)}"
            )
        manifest_bytes = top.get("manifest")
        if not isinstance(manifest_bytes, bytes):
            raise PackageError(
                "package field 'manifest' must be a byte string holding the encoded manifest"
            )
        files = top.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()
        ):
            raise PackageError("package field 'files' must be a map from text name to bytes")
        signature = _parse_signature(top)

        # Verify before parsing the manifest: with trusted keys, unsigned bytes are never decoded.
        verified: str | None = None
        if signature is None:
            if require_signature:
                raise PackageError("package is unsigned, but a signature is required")
        elif trusted_keys is not None:
            verified = _verify_signature(signature, manifest_bytes, trusted_keys)
        elif require_signature:
            raise PackageError(
                "a signature is required, but no trusted public keys were given to check it"
            )

        manifest = validate_manifest(_decode_one(manifest_bytes, "manifest"))
        if manifest["format_version"] != version:
            raise PackageError(
                f"manifest format_version {manifest['format_version']} differs from the "
                f"package's {version}"
            )
        _check_files(manifest, files)
        _check_weights(manifest, files)

        pkg = cls(manifest, files, signature)
        pkg.verified_key_id = verified
        pkg._signed_manifest = manifest_bytes if signature is not None else None
        pkg._encoded = data
        return pkg

    @classmethod
    def read(
        cls,
        path: str | os.PathLike[str],
        *,
        trusted_keys: Iterable[bytes | Ed25519PublicKey] | None = None,
        require_signature: bool = False,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> ModelPackage:
        """Read and validate a package file; an oversized file is refused before reading it."""
        size = os.stat(path).st_size
        if size > max_size:
            raise PackageError(f"package is {size} bytes, over the limit of {max_size} bytes")
        with open(path, "rb") as fh:
            data = fh.read(max_size + 1)
        return cls.loads(
            data, trusted_keys=trusted_keys, require_signature=require_signature, max_size=max_size
        )

    # -- use ----------------------------------------------------------------------------------

    def initial_weights(self) -> dict[str, np.ndarray]:
        """The session's first global model, as stored in the weights file (writable copies)."""
        return {k: v.copy() for k, v in _check_weights(self.manifest, self.files).items()}


def _parse_signature(top: Mapping[str, Any]) -> dict[str, Any] | None:
    if "signature" not in top:
        return None
    sig = top["signature"]
    if not isinstance(sig, dict):
        raise PackageError(f"package field 'signature' must be a map, got {sig!r}")
    alg = sig.get("alg")
    if alg != SIGNATURE_ALG:
        raise PackageError(f"unsupported signature algorithm {alg!r}; supported: '{SIGNATURE_ALG}'")
    kid = sig.get("key_id")
    if not isinstance(kid, str) or not re.fullmatch(r"[0-9a-f]{32}", kid):
        raise PackageError(f"signature key_id must be 32 lower-case hex digits, got {kid!r}")
    raw = sig.get("sig")
    if not isinstance(raw, bytes) or len(raw) != 64:
        raise PackageError("signature 'sig' must be a 64-byte Ed25519 signature")
    return {"alg": alg, "key_id": kid, "sig": raw}


def _verify_signature(
    signature: Mapping[str, Any],
    manifest_bytes: bytes,
    trusted_keys: Iterable[bytes | Ed25519PublicKey],
) -> str:
    by_id: dict[str, bytes] = {}
    for key in trusted_keys:
        raw = _public_raw(key)
        by_id[key_id(raw)] = raw
    kid = signature["key_id"]
    if kid not in by_id:
        known = ", ".join(sorted(by_id)) or "none"
        raise PackageError(
            f"package is signed by key {kid}, which is not a trusted key (trusted: {known})"
        )
    if not _verify_ed25519(by_id[kid], signature["sig"], signed_message(manifest_bytes)):
        raise PackageError(
            f"invalid signature by key {kid}: the manifest or the signature was altered"
        )
    return str(kid)


# ---------------------------------------------------------------------------------------------
# Device data against the package


def _fits(expected: Shape, actual: tuple[int, ...]) -> bool:
    """Per-example shapes agree (symbolic dims match anything) or have equal element counts."""
    exp, act = expected[1:], actual[1:]
    if len(exp) == len(act) and all(
        not _is_int(e) or int(e) < 0 or int(e) == a for e, a in zip(exp, act)
    ):
        return True
    size = _example_size(expected)
    return size is not None and size == int(np.prod(act, dtype=np.int64))


def _shape_text(shape: Shape | tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_data_shape(
    manifest: Mapping[str, Any],
    x: np.ndarray | Mapping[str, np.ndarray],
    y: np.ndarray | None = None,
) -> None:
    """Refuse local data that does not fit the package's inputs (and labels, when given).

    The first axis is the example axis. Each example must have the input's per-example
    shape, or the same number of elements (trainers reshape row-major, so flat (n, 64) data
    fits a (-1, 1, 8, 8) input). With ``num_classes`` in the labels, labels must be in range.
    """
    inputs: list[dict[str, Any]] = list(manifest["inputs"])
    if isinstance(x, Mapping):
        arrays = dict(x)
    elif len(inputs) == 1:
        arrays = {inputs[0]["name"]: x}
    else:
        names = ", ".join(spec["name"] for spec in inputs)
        raise PackageError(f"package has {len(inputs)} inputs ({names}); pass a map of arrays")
    n: int | None = None
    for spec in inputs:
        if spec["name"] not in arrays:
            raise PackageError(f"local data has no array for package input '{spec['name']}'")
        arr = np.asarray(arrays[spec["name"]])
        if arr.ndim == 0 or not _fits(spec["shape"], arr.shape):
            raise PackageError(
                f"package input '{spec['name']}' expects {_shape_text(spec['shape'])}, "
                f"local data has {_shape_text(arr.shape)}"
            )
        if n is not None and arr.shape[0] != n:
            raise PackageError(f"input '{spec['name']}' has {arr.shape[0]} examples, others {n}")
        n = arr.shape[0]
    if y is None:
        return
    labels = manifest["labels"]
    y = np.asarray(y)
    if y.ndim == 0 or not _fits(labels["shape"], y.shape) or len(labels["shape"]) < 1:
        raise PackageError(
            f"package labels '{labels['name']}' expect {_shape_text(labels['shape'])}, "
            f"local labels have {_shape_text(y.shape)}"
        )
    if n is not None and y.shape[0] != n:
        raise PackageError(f"local data has {n} examples but {y.shape[0]} labels")
    k = labels.get("num_classes")
    if k is not None and y.size:
        if not np.issubdtype(y.dtype, np.integer):
            raise PackageError(f"labels '{labels['name']}' must be integers, got {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= k:
            raise PackageError(
                f"labels '{labels['name']}' must lie in [0, {k}), local labels span [{lo}, {hi}]"
            )


def apply_preprocessing(manifest: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """Apply the manifest's preprocessing to raw device data: ``(x * scale - mean) / std``.

    ``mean``/``std`` are a number or one value per feature of a flattened example. Returns a
    new float64 array of x's shape; trainers cast it to the model's input dtype.
    """
    pre: Mapping[str, Any] = manifest.get("preprocessing") or {}
    out = np.array(x, dtype=np.float64)
    if "scale" in pre:
        out *= float(pre["scale"])
    if "mean" in pre or "std" in pre:
        flat = out.reshape(out.shape[0], -1)
        if "mean" in pre:
            flat -= np.asarray(pre["mean"], dtype=np.float64)
        if "std" in pre:
            flat /= np.asarray(pre["std"], dtype=np.float64)
        out = flat.reshape(out.shape)
    return out
