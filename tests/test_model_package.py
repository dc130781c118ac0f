"""The model package format, its signatures and the `edgefl package` CLI.

Format tests build ``TrainingArtifacts`` by hand (the format never interprets the model
files); the end-to-end test builds a package from a real ONNX model with the real builder.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import cbor2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgefl.cli.package import package_app
from edgefl.packages import signing
from edgefl.packages.artifacts import TrainingArtifacts
from edgefl.packages.format import (
    FORMAT_TAG,
    REQUIRED_MANIFEST_FIELDS,
    SIGNATURE_CONTEXT,
    ModelPackage,
    PackageError,
    apply_preprocessing,
    check_data_shape,
    encode_manifest,
    key_id,
)
from edgefl.protocol.tensors import loads_tensors

MODEL_BYTES = bytes(range(256)) * 4


def make_artifacts(framework: str = "onnx") -> TrainingArtifacts:
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((64, 10)).astype(np.float32),
        "b": np.zeros(10, np.float32),
    }
    manifest = {
        "parameters": [
            {"name": "W", "dtype": "float32", "shape": (64, 10)},
            {"name": "b", "dtype": "float32", "shape": [np.int64(10)]},
        ],
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 64]}],
        "labels": {"name": "y", "dtype": "int64", "shape": [-1]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "ops": ["Add", "MatMul"],
        "training": {"data": "x", "labels": "y", "loss": "loss"},
    }
    files = {"model.onnx": MODEL_BYTES, "train_step.onnx": b"train-step" * 50}
    return TrainingArtifacts(framework, files, manifest, weights)


def make_package(**kw) -> ModelPackage:
    pre = {"scale": 0.0625, "mean": [0.5] * 64, "std": [2.0] * 64, "description": "8x8 digits"}
    return ModelPackage.from_artifacts(
        make_artifacts(),
        name="digits-softmax",
        preprocessing=pre,
        created="2026-11-05T10:00:00Z",
        extra={"labels": {"name": "y", "dtype": "int64", "shape": [-1], "num_classes": 10}},
        **kw,
    )


def reencode(data: bytes, *, top=None, manifest=None) -> bytes:
    """Decode a package, let callbacks alter it, and encode it again (no re-signing)."""
    doc = cbor2.loads(data)
    if manifest is not None:
        m = cbor2.loads(doc["manifest"])
        manifest(m)
        doc["manifest"] = cbor2.dumps(m, canonical=True)
    if top is not None:
        top(doc)
    return cbor2.dumps(doc)


def refused(data: bytes, **kw) -> str:
    with pytest.raises(PackageError) as info:
        ModelPackage.loads(data, **kw)
    return str(info.value)


@pytest.fixture(scope="module")
def key():
    return signing.generate_private_key()


@pytest.fixture(scope="module")
def other_key():
    return signing.generate_private_key()


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_keeps_manifest_files_and_weights():
    pkg = make_package()
    data = pkg.dumps()
    assert data == make_package().dumps()  # deterministic: same input, same bytes
    back = ModelPackage.loads(data)
    assert back.manifest == pkg.manifest
    assert back.files == pkg.files
    assert back.signature is None
    assert back.verified_key_id is None
    assert back.digest == hashlib.sha256(data).hexdigest() == pkg.digest
    w0, w1 = pkg.initial_weights(), back.initial_weights()
    assert sorted(w1) == ["W", "b"]
    for name in w0:
        assert w1[name].dtype == w0[name].dtype
        np.testing.assert_array_equal(w1[name], w0[name])
    w1["W"][0, 0] = 123.0  # writable copy, the package is untouched
    assert back.initial_weights()["W"][0, 0] != 123.0
    m = back.manifest
    assert m["format_version"] == 1
    assert m["framework"] == "onnx"
    assert m["name"] == "digits-softmax"
    assert m["parameters"][1]["shape"] == [10]  # tuples and numpy ints became plain data
    assert m["weights"] == "weights.cbor"
    assert set(m["files"]) == set(back.files)
    assert m["files"]["model.onnx"] == {
        "sha256": hashlib.sha256(MODEL_BYTES).hexdigest(),
        "size": len(MODEL_BYTES),
    }
    assert loads_tensors(back.files["weights.cbor"]).keys() == {"W", "b"}


def test_layout_top_level_and_signed_bytes(key):
    """The documented layout: key order, manifest as a deterministic CBOR byte string."""
    pkg = make_package()
    data = pkg.dumps(signing_key=key)
    doc = cbor2.loads(data)
    assert list(doc) == ["format", "format_version", "manifest", "signature", "files"]
    assert doc["format"] == FORMAT_TAG
    assert doc["format_version"] == 1
    assert doc["manifest"] == encode_manifest(pkg.manifest)
    assert doc["manifest"] == cbor2.dumps(cbor2.loads(doc["manifest"]), canonical=True)
    sig = doc["signature"]
    assert sig["alg"] == "ed25519"
    assert len(sig["sig"]) == 64
    pub = signing.public_key_bytes(key)
    assert sig["key_id"] == hashlib.sha256(pub).digest()[:16].hex() == key_id(pub)
    # Verifiable from the docs alone: Ed25519 over the context string + the manifest bytes.
    assert signing.verify(pub, sig["sig"], b"edgefl-model-package\x00" + doc["manifest"])
    assert SIGNATURE_CONTEXT == b"edgefl-model-package\x00"


def test_write_and_read(tmp_path, key):
    pkg = make_package()
    path = tmp_path / "m.efp"
    digest = pkg.write(path, signing_key=key)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    back = ModelPackage.read(path, trusted_keys=[key.public_key()], require_signature=True)
    assert back.digest == digest
    assert back.verified_key_id == signing.key_id_of(key)
    assert not list(tmp_path.glob("*.tmp-*"))


# --- signatures ----------------------------------------------------------------------------------


def test_sign_and_verify_with_generated_key(key, other_key):
    data = make_package().dumps(signing_key=key)
    raw_pub = signing.public_key_bytes(key)
    for trusted in ([raw_pub], [key.public_key()], [signing.public_key_bytes(other_key), raw_pub]):
        pkg = ModelPackage.loads(data, trusted_keys=trusted, require_signature=True)
        assert pkg.verified_key_id == key_id(raw_pub)
    # Without trusted keys the signature is parsed but not checked.
    pkg = ModelPackage.loads(data)
    assert pkg.signature["key_id"] == key_id(raw_pub)
    assert pkg.verified_key_id is None
    # Re-encoding a loaded, signed package keeps the signature valid.
    assert ModelPackage.loads(pkg.dumps(), trusted_keys=[raw_pub]).verified_key_id


def test_wrong_key_is_refused_and_named(key, other_key):
    data = make_package().dumps(signing_key=key)
    msg = refused(data, trusted_keys=[other_key.public_key()])
    assert f"signed by key {signing.key_id_of(key)}" in msg
    assert "not a trusted key" in msg
    assert signing.key_id_of(other_key) in msg


def test_forged_key_id_is_an_invalid_signature(key, other_key):
    """An attacker naming a trusted key id but signing with its own key."""
    data = make_package().dumps(signing_key=other_key)
    forged = reencode(data, top=lambda d: d["signature"].update(key_id=signing.key_id_of(key)))
    msg = refused(forged, trusted_keys=[key.public_key()])
    assert f"invalid signature by key {signing.key_id_of(key)}" in msg


def test_tampered_manifest_breaks_the_signature(key):
    data = make_package().dumps(signing_key=key)
    # Change the learning rate inside the signed manifest, keep the old signature.
    tampered = reencode(data, manifest=lambda m: m["optimizer"].update(lr=10.0))
    msg = refused(tampered, trusted_keys=[key.public_key()])
    assert "invalid signature" in msg
    assert signing.key_id_of(key) in msg
    # A single flipped byte inside the manifest bytes, found in the raw file.
    needle = b"digits-softmax"
    i = data.index(needle)
    flipped = data[:i] + b"D" + data[i + 1 :]
    assert "invalid signature" in refused(flipped, trusted_keys=[key.public_key()])


def test_tampered_manifest_unsigned_fails_the_file_digest():
    """Unsigned: swapping a file and its table entry is undetectable, but a lone edit is."""
    data = make_package().dumps()
    bad = reencode(data, manifest=lambda m: m["files"]["model.onnx"].update(sha256="0" * 64))
    assert "file 'model.onnx' does not match its digest" in refused(bad)


@pytest.mark.parametrize("signed", [False, True])
def test_tampered_file_byte_names_the_file(key, signed):
    data = make_package().dumps(signing_key=key if signed else None)
    i = data.index(MODEL_BYTES) + 100
    tampered = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
    trusted = [key.public_key()] if signed else None
    msg = refused(tampered, trusted_keys=trusted)
    assert "file 'model.onnx' does not match its digest in the manifest" in msg


def test_missing_signature_when_required(key):
    data = make_package().dumps()
    assert "unsigned, but a signature is required" in refused(
        data, trusted_keys=[key.public_key()], require_signature=True
    )
    # Stripping the signature off a signed package is the same case.
    stripped = reencode(make_package().dumps(signing_key=key), top=lambda d: d.pop("signature"))
    assert "unsigned" in refused(stripped, trusted_keys=[key.public_key()], require_signature=True)
    signed = make_package().dumps(signing_key=key)
    assert "no trusted public keys" in refused(signed, require_signature=True)


def test_bad_signature_fields(key):
    data = make_package().dumps(signing_key=key)
    bad_alg = reencode(data, top=lambda d: d["signature"].update(alg="rsa"))
    assert "unsupported signature algorithm 'rsa'" in refused(bad_alg)
    short = reencode(data, top=lambda d: d["signature"].update(sig=b"\x00" * 10))
    assert "64-byte" in refused(short)


def test_changed_manifest_after_signing_must_be_resigned(key):
    pkg = ModelPackage.loads(make_package().dumps(signing_key=key))
    pkg.manifest["name"] = "renamed"
    with pytest.raises(PackageError, match="changed after it was signed"):
        pkg.dumps()
    again = ModelPackage.loads(pkg.dumps(signing_key=key), trusted_keys=[key.public_key()])
    assert again.manifest["name"] == "renamed"
    assert again.verified_key_id


# --- refusals: structure -------------------------------------------------------------------------


def test_not_cbor_and_not_a_package():
    assert "does not start with a CBOR map (first byte 0x50)" in refused(b"PK\x03\x04zipfile")
    assert "does not start with a CBOR map (first byte 0x83)" in refused(cbor2.dumps([1, 2, 3]))
    assert "does not start with a CBOR map" in refused(b'{"format": "json"}')
    assert "not a valid CBOR data item" in refused(b"\xa1\x1c\x00")  # reserved info 28
    msg = refused(cbor2.dumps({"format": "onnx-model", "format_version": 1}))
    assert "format is 'onnx-model', expected 'edgefl-model-package'" in msg
    assert "format is None" in refused(cbor2.dumps({"hello": 1}))


def test_truncated_and_trailing_bytes():
    data = make_package().dumps()
    for cut in (1, 100, len(data) // 2, len(data) - 5):
        assert "truncated" in refused(data[:cut])
    assert "3 bytes of trailing data" in refused(data + b"abc")
    assert "package is empty" in refused(b"")


def test_unsupported_format_version_is_named():
    data = make_package().dumps()
    for version in (2, 0):
        bad = reencode(data, top=lambda d, v=version: d.update(format_version=v))
        assert f"unsupported format_version {version}" in refused(bad)
    bad = reencode(data, manifest=lambda m: m.update(format_version=7))
    assert "unsupported manifest format_version 7" in refused(bad)


def test_oversized_package_is_refused_before_decoding(tmp_path):
    data = make_package().dumps()
    msg = refused(data, max_size=len(data) - 1)
    assert f"package is {len(data)} bytes, over the limit of {len(data) - 1} bytes" in msg
    # Read from disk: refused by its size alone, even though it is not even CBOR.
    path = tmp_path / "big.efp"
    path.write_bytes(b"\xff" * 5000)
    with pytest.raises(PackageError, match="over the limit of 4096 bytes"):
        ModelPackage.read(path, max_size=4096)
    good = tmp_path / "ok.efp"
    good.write_bytes(data)
    assert ModelPackage.read(good).digest == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("field", REQUIRED_MANIFEST_FIELDS)
def test_missing_manifest_field_is_named(field):
    bad = reencode(make_package().dumps(), manifest=lambda m: m.pop(field))
    assert f"manifest is missing required field '{field}'" in refused(bad)


def test_unsupported_framework_is_named():
    bad = reencode(make_package().dumps(), manifest=lambda m: m.update(framework="pytorch"))
    assert "unsupported framework 'pytorch'" in refused(bad)
    with pytest.raises(PackageError, match="unsupported framework 'caffe'"):
        ModelPackage.from_artifacts(make_artifacts("caffe"), name="x")


def test_listed_but_absent_and_present_but_unlisted():
    data = make_package().dumps()
    absent = reencode(data, top=lambda d: d["files"].pop("train_step.onnx"))
    assert "file 'train_step.onnx' is listed in the manifest but absent" in refused(absent)
    extra = reencode(data, top=lambda d: d["files"].update({"evil.so": b"\x7fELF"}))
    assert "file 'evil.so' is in the package but not listed in the manifest" in refused(extra)
    resized = reencode(data, manifest=lambda m: m["files"]["model.onnx"].update(size=1))
    assert "file 'model.onnx' does not match the manifest: 1024 bytes, expected 1" in refused(
        resized
    )


def test_unsafe_file_names_are_refused():
    def rename(d):
        d["files"]["../x"] = d["files"].pop("model.onnx")

    def rename_m(m):
        m["files"]["../x"] = m["files"].pop("model.onnx")

    bad = reencode(make_package().dumps(), top=rename, manifest=rename_m)
    assert "file name '../x' is not allowed" in refused(bad)


def test_manifest_field_types_are_checked():
    data = make_package().dumps()
    cases = [
        (lambda m: m.update(name=""), "'name' must be non-empty text"),
        (lambda m: m.update(parameters=[]), "'parameters' must be a non-empty array"),
        (lambda m: m["parameters"][0].update(dtype="float8"), "has dtype 'float8'"),
        (lambda m: m["parameters"][0].update(shape=[-1, 10]), "non-negative integers"),
        (lambda m: m["parameters"].append(dict(m["parameters"][0])), "listed twice"),
        (lambda m: m["inputs"][0].update(shape=[]), "needs a batch dimension"),
        (lambda m: m["optimizer"].update(lr="fast"), "optimizer.lr must be a number"),
        (lambda m: m["labels"].update(num_classes=0), "num_classes must be a positive"),
        (lambda m: m.update(weights="nope.cbor"), "'weights' names 'nope.cbor'"),
        (lambda m: m["preprocessing"].update(whiten=True), "unsupported preprocessing step"),
        (lambda m: m["preprocessing"].update(mean=[0.0] * 3), "has 3 values"),
        (lambda m: m["preprocessing"].update(std=0), "must not contain zeros"),
        (lambda m: m.update(training=[1]), "'training' must be a map"),
    ]
    for change, expected in cases:
        assert expected in refused(reencode(data, manifest=change)), expected
    # Informational preprocessing keys are allowed.
    ok = reencode(data, manifest=lambda m: m["preprocessing"].update({"x-source": "camera"}))
    assert ModelPackage.loads(ok).manifest["preprocessing"]["x-source"] == "camera"


def test_manifest_holds_only_plain_data():
    doc = cbor2.loads(make_package().dumps())
    m = cbor2.loads(doc["manifest"])
    m["preprocessing"]["x-blob"] = b"bytes"
    doc["manifest"] = cbor2.dumps(m, canonical=True)
    assert "manifest.preprocessing.x-blob holds a bytes" in refused(cbor2.dumps(doc))
    m["preprocessing"]["x-blob"] = cbor2.CBORTag(1, 0)  # cbor2 turns tag 1 into a datetime
    doc["manifest"] = cbor2.dumps(m, canonical=True)
    assert "holds a datetime" in refused(cbor2.dumps(doc))


def test_weights_must_match_parameters():
    from edgefl.protocol.tensors import dumps_tensors

    def swap(d):
        d["files"]["weights.cbor"] = dumps_tensors({"W": np.zeros((64, 10), np.float64)})

    def fix_digest(m):
        blob = dumps_tensors({"W": np.zeros((64, 10), np.float64)})
        m["files"]["weights.cbor"] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}

    msg = refused(reencode(make_package().dumps(), top=swap, manifest=fix_digest))
    assert "weights file 'weights.cbor' does not match 'parameters': missing ['b']" in msg
    art = make_artifacts()
    art.initial_weights["W"] = art.initial_weights["W"].astype(np.float64)
    with pytest.raises(PackageError, match="tensor 'W' is float64"):
        ModelPackage.from_artifacts(art, name="x")


# --- device data ---------------------------------------------------------------------------------


def test_check_data_shape():
    m = make_package().manifest
    x = np.zeros((37, 64))
    check_data_shape(m, x, np.arange(37) % 10)
    check_data_shape(m, {"x": x})
    with pytest.raises(PackageError) as info:
        check_data_shape(m, np.zeros((37, 63)))
    assert str(info.value) == "package input 'x' expects (N, 64), local data has (37, 63)"
    check_data_shape(m, np.zeros((5, 8, 8)))  # same elements per example: trainers reshape
    with pytest.raises(PackageError, match="local data has no array for package input 'x'"):
        check_data_shape(m, {"image": x})
    with pytest.raises(PackageError, match=r"must lie in \[0, 10\), local labels span \[0, 10\]"):
        check_data_shape(m, x, np.arange(37) % 11)
    with pytest.raises(PackageError, match="37 examples but 36 labels"):
        check_data_shape(m, x, np.zeros(36, np.int64))
    with pytest.raises(PackageError, match=r"labels 'y' expect \(-1,\), local labels have"):
        check_data_shape(m, x, np.zeros((37, 2), np.int64))
    cnn = dict(m, inputs=[{"name": "img", "dtype": "float32", "shape": [-1, 1, 8, 8]}])
    check_data_shape(cnn, np.zeros((4, 64)))
    with pytest.raises(PackageError, match=r"'img' expects \(-1, 1, 8, 8\)"):
        check_data_shape(cnn, np.zeros((4, 65)))


def test_apply_preprocessing():
    m = make_package().manifest
    raw = np.arange(128, dtype=np.int64).reshape(2, 64)
    out = apply_preprocessing(m, raw)
    np.testing.assert_allclose(out, (raw * 0.0625 - 0.5) / 2.0)
    assert out.dtype == np.float64
    assert raw[0, 1] == 1
    assert np.array_equal(apply_preprocessing(dict(m, preprocessing={}), raw), raw)


# --- keys ----------------------------------------------------------------------------------------


def test_key_files_round_trip(tmp_path):
    key = signing.generate_private_key()
    priv, pub = signing.save_keypair(key, tmp_path / "release")
    assert priv.name == "release.key"
    assert pub.name == "release.pub"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    lines = [ln for ln in pub.read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 1
    assert len(lines[0]) == 44
    assert signing.public_key_bytes(signing.load_public_key(pub)) == signing.public_key_bytes(key)
    loaded = signing.load_private_key(priv)
    assert signing.public_key_bytes(loaded) == signing.public_key_bytes(key)
    msg = b"hello"
    assert signing.verify(signing.load_public_key(pub), signing.sign(loaded, msg), msg)
    assert not signing.verify(signing.load_public_key(pub), signing.sign(loaded, msg), b"other")
    with pytest.raises(FileExistsError):
        signing.save_keypair(key, tmp_path / "release")
    pub.write_text("not base64!!\n")
    with pytest.raises(PackageError, match="not valid base64"):
        signing.load_public_key(pub)
    pub.write_text("AAAA\n")
    with pytest.raises(PackageError, match="32 bytes, this one has 3"):
        signing.load_public_key(pub)


# --- CLI -----------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_help_for_every_command():
    top = runner.invoke(package_app, ["--help"])
    assert top.exit_code == 0
    for cmd in ("build", "inspect", "verify", "keygen"):
        assert cmd in top.output
        result = runner.invoke(package_app, [cmd, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output
        assert len(result.output) > 200


def test_cli_keygen_verify_inspect(tmp_path):
    stem = tmp_path / "keys" / "release"
    stem.parent.mkdir()
    result = runner.invoke(package_app, ["keygen", str(stem)])
    assert result.exit_code == 0, result.output
    key = signing.load_private_key(f"{stem}.key")
    assert f"key_id {signing.key_id_of(key)}" in result.output
    assert runner.invoke(package_app, ["keygen", str(stem)]).exit_code == 1  # no overwrite
    other = tmp_path / "other"
    assert runner.invoke(package_app, ["keygen", str(other)]).exit_code == 0

    signed = tmp_path / "signed.efp"
    make_package().write(signed, signing_key=key)
    unsigned = tmp_path / "unsigned.efp"
    make_package().write(unsigned)
    pub = f"{stem}.pub"

    ok = runner.invoke(package_app, ["verify", str(signed), "--public-key", pub])
    assert ok.exit_code == 0, ok.output
    assert f"signed by trusted key {signing.key_id_of(key)}" in ok.output
    b64 = Path(pub).read_text().splitlines()[-1]
    ok = runner.invoke(package_app, ["verify", str(signed), "--public-key", b64])
    assert ok.exit_code == 0
    assert "signed by trusted key" in ok.output
    ok = runner.invoke(package_app, ["verify", str(unsigned)])
    assert ok.exit_code == 0
    assert "UNSIGNED" in ok.output

    wrong = runner.invoke(package_app, ["verify", str(signed), "--public-key", f"{other}.pub"])
    assert wrong.exit_code == 1
    assert "not a trusted key" in wrong.output
    req = runner.invoke(
        package_app, ["verify", str(unsigned), "--public-key", pub, "--require-signature"]
    )
    assert req.exit_code == 1
    assert "unsigned, but a signature is required" in req.output
    assert (
        runner.invoke(package_app, ["verify", str(unsigned), "--require-signature"]).exit_code == 2
    )

    data = signed.read_bytes()
    i = data.index(MODEL_BYTES) + 7
    tampered = tmp_path / "tampered.efp"
    tampered.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    bad = runner.invoke(package_app, ["verify", str(tampered), "--public-key", pub])
    assert bad.exit_code == 1
    assert "INVALID" in bad.output
    assert "file 'model.onnx' does not match its digest" in bad.output

    table = runner.invoke(package_app, ["inspect", str(signed)])
    assert table.exit_code == 0, table.output
    for text in ("digits-softmax", "model.onnx", "weights.cbor", "(N, 64)", "<64 values>"):
        assert text in table.output, text
    assert signing.key_id_of(key) in table.output.replace("\n", "").replace("│", "")
    as_json = runner.invoke(package_app, ["inspect", str(signed), "--json"])
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.output)
    assert doc["manifest"] == ModelPackage.read(signed).manifest
    assert doc["digest"] == hashlib.sha256(data).hexdigest()
    assert doc["signature"] == {"alg": "ed25519", "key_id": signing.key_id_of(key)}
    bad = runner.invoke(package_app, ["inspect", str(tampered)])
    assert bad.exit_code == 1
    assert "does not match its digest" in bad.output


# --- the documented worked example ----------------------------------------------------------------

DOC = next(
    d / "docs" / "model-package.md"
    for d in Path(__file__).resolve().parents
    if (d / "docs" / "model-package.md").is_file()
)


def worked_example_package() -> ModelPackage:
    """The inputs of docs/model-package.md section 11."""
    manifest = {
        "parameters": [{"name": "b", "dtype": "float32", "shape": [2]}],
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}],
        "labels": {"name": "y", "dtype": "int64", "shape": [-1]},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.5},
        "training": {},
    }
    weights = {"b": np.array([1.5, -2.0], np.float32)}
    art = TrainingArtifacts("onnx", {"model.onnx": b"\x08\x09"}, manifest, weights)
    return ModelPackage.from_artifacts(art, name="t", created="2026-11-05T10:00:00Z")


def test_documented_worked_example_byte_for_byte():
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- worked-example-begin -->")[1].split("<!-- worked-example-end -->")[0]
    data = bytes.fromhex("".join(block.replace("```", "").split()))
    pub_hex = re.search(r"Its public key is\s+`([0-9a-f]{64})`", text).group(1)
    kid = re.search(r"key id `([0-9a-f]{32})`", text).group(1)
    digest = re.search(r"Package digest: `([0-9a-f]{64})`", text).group(1)
    seed = bytes(range(32))  # the documented example seed 00 01 ... 1f
    assert (
        signing.public_key_bytes(
            signing.private_key_from_text("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        ).hex()
        == pub_hex
    )
    pkg = ModelPackage.loads(data, trusted_keys=[bytes.fromhex(pub_hex)], require_signature=True)
    assert pkg.verified_key_id == kid
    assert pkg.digest == digest
    assert len(data) == 711
    assert data[57 : 57 + 466] == cbor2.loads(data)["manifest"]  # offset and length as documented
    np.testing.assert_array_equal(pkg.initial_weights()["b"], np.array([1.5, -2.0], np.float32))
    # The reference writer produces exactly the documented bytes.
    assert worked_example_package().dumps(signing_key=seed) == data


# --- end to end: a real ONNX model through the real builder -------------------------------------


def softmax_onnx(path: Path, *, op: str = "MatMul") -> np.ndarray:
    """A 64->10 softmax regression as an ONNX file (float32, seeded small initial weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = (0.01 * rng.standard_normal((64, 10))).astype(np.float32)
    b = np.zeros(10, np.float32)
    nodes = [helper.make_node(op, ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    if op == "Einsum":
        nodes[0] = helper.make_node("Einsum", ["x", "W"], ["xw"], equation="nk,kc->nc")
    graph = helper.make_graph(
        nodes,
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def raw_digits():
    """The digits split of the canonical task, before standardisation (what a device holds)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(y))
    test, train = perm[:360], perm[360:]
    return x[train], y[train].astype(np.int64), x[test], y[test].astype(np.int64)


def test_build_package_from_real_onnx_and_train_from_it(tmp_path, key):
    from edgefl.packages.build import build_package
    from edgefl.tasks import digits

    model = tmp_path / "softmax.onnx"
    w0 = softmax_onnx(model)
    xtr, ytr, xte, yte = raw_digits()
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd == 0] = 1
    pre = {"mean": mu, "std": sd, "description": "digits, standardised on the train split"}
    pkg = build_package(model, name="digits-softmax", labels=10, preprocessing=pre, signing_key=key)
    out = tmp_path / "digits.efp"
    digest = pkg.write(out)

    back = ModelPackage.read(out, trusted_keys=[key.public_key()], require_signature=True)
    assert back.digest == digest
    assert back.verified_key_id == signing.key_id_of(key)
    m = back.manifest
    assert set(back.files) == {"model.onnx", "train_step.onnx", "eval.onnx", "weights.cbor"}
    assert back.files["model.onnx"] == model.read_bytes()
    assert m["framework"] == "onnx"
    assert [(p["name"], p["dtype"], p["shape"]) for p in m["parameters"]] == [
        ("W", "float32", [64, 10]),
        ("b", "float32", [10]),
    ]
    assert m["labels"]["num_classes"] == 10
    assert m["optimizer"]["name"] == "sgd"
    init = back.initial_weights()
    np.testing.assert_array_equal(init["W"], w0)
    np.testing.assert_array_equal(init["b"], np.zeros(10, np.float32))

    # Device side: raw data -> the package's preprocessing -> the canonical standardised data.
    x = apply_preprocessing(m, xtr)
    np.testing.assert_allclose(x, digits.load().Xtr, rtol=0, atol=1e-12)
    check_data_shape(m, x, ytr)
    with pytest.raises(PackageError, match=r"input 'x' expects \(-1, 64\), local data has"):
        check_data_shape(m, x[:, :63])

    # The device trainer needs nothing but the package: one round of SGD learns.
    from device_agent.trainers.base import TrainTask
    from device_agent.trainers.onnx_trainer import OnnxTrainer

    trainer = OnnxTrainer.from_package(back, x, ytr)
    held_out = OnnxTrainer.from_package(back, apply_preprocessing(m, xte), yte)
    before = held_out.evaluate(init)
    result = trainer.train(init, TrainTask(round=1, config={}, seed=0))
    after = held_out.evaluate(result.weights)
    assert result.num_examples == len(ytr)
    assert after["loss"] < before["loss"] / 3
    assert after["accuracy"] > 0.85
    assert after["accuracy"] > before["accuracy"] + 0.5


def test_rebuilding_with_source_date_epoch_gives_the_same_digest(tmp_path, monkeypatch):
    from edgefl.packages.build import build_package

    model = tmp_path / "m.onnx"
    softmax_onnx(model)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1790000000")
    first = build_package(model, labels=10)
    second = build_package(model, labels=10)
    expected = datetime.datetime.fromtimestamp(1790000000, datetime.timezone.utc)
    assert first.manifest["created"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert first.dumps() == second.dumps()
    assert first.digest == second.digest


def test_cli_build_verify_inspect_real_onnx(tmp_path):
    model = tmp_path / "softmax.onnx"
    softmax_onnx(model)
    stem = tmp_path / "release"
    assert runner.invoke(package_app, ["keygen", str(stem)]).exit_code == 0
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"scale": 0.0625, "description": "pixels 0..16"}))
    out = tmp_path / "m.efp"
    args = ["build", str(model), "--out", str(out), "--name", "digits", "--labels", "10"]
    args += ["--optimizer", "momentum", "--lr", "0.05", "--preprocessing", str(pre)]
    result = runner.invoke(package_app, [*args, "--sign-key", f"{stem}.key"])
    assert result.exit_code == 0, result.output
    key_id_text = signing.key_id_of(signing.load_public_key(f"{stem}.pub"))
    assert f"signed by key {key_id_text}" in result.output
    assert f"digest sha256:{hashlib.sha256(out.read_bytes()).hexdigest()}" in result.output

    ok = runner.invoke(
        package_app, ["verify", str(out), "--public-key", f"{stem}.pub", "--require-signature"]
    )
    assert ok.exit_code == 0, ok.output
    doc = json.loads(runner.invoke(package_app, ["inspect", str(out), "--json"]).output)
    assert doc["manifest"]["optimizer"] == {"name": "momentum", "lr": 0.05, "momentum": 0.9}
    assert doc["manifest"]["preprocessing"]["scale"] == 0.0625
    assert doc["manifest"]["name"] == "digits"

    # A model the builder cannot differentiate: non-zero exit, the op named.
    bad = tmp_path / "einsum.onnx"
    softmax_onnx(bad, op="Einsum")
    result = runner.invoke(package_app, ["build", str(bad), "--out", str(tmp_path / "x.efp")])
    assert result.exit_code == 1
    assert "Einsum" in result.output
    assert not (tmp_path / "x.efp").exists()
    result = runner.invoke(package_app, ["build", str(pre), "--out", str(tmp_path / "y.efp")])
    assert result.exit_code == 1
    assert "expected a .onnx or .tflite file" in result.output


def test_build_package_from_the_litert_fixture_and_train_from_it(tmp_path, key):
    """The .tflite branch of build_package, with the committed LiteRT fixture and trainer."""
    import edgefl.packages
    from device_agent.trainers.base import TrainTask
    from device_agent.trainers.litert_trainer import LiteRtTrainer
    from edgefl.packages.build import build_package
    from edgefl.tasks import digits

    models = Path(edgefl.packages.__file__).resolve().parent / "models"
    pkg = build_package(models / "digits_litert.tflite", name="digits-litert", signing_key=key)
    out = tmp_path / "litert.efp"
    pkg.write(out)
    back = ModelPackage.read(out, trusted_keys=[key.public_key()], require_signature=True)
    assert back.manifest["framework"] == "tflite"
    assert set(back.files) == {"model.tflite", "weights.cbor"}
    assert back.manifest["labels"]["num_classes"] == 10
    x, y = digits.device_data(10, 3)
    check_data_shape(back.manifest, x, y)
    trainer = LiteRtTrainer.from_package(back, x, y)
    init = back.initial_weights()
    before = trainer.evaluate(init)
    result = trainer.train(init, TrainTask(round=1, config={"epochs": 3}, seed=3))
    after = trainer.evaluate(result.weights)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > before["accuracy"]
    assert after["accuracy"] > 0.8
    assert {k: (v.dtype, v.shape) for k, v in result.weights.items()} == {
        k: (v.dtype, v.shape) for k, v in init.items()
    }

    # A model without the restore signature is refused by `package build`, naming it.
    result = runner.invoke(
        package_app,
        ["build", str(models / "digits_litert_no_restore.tflite"), "--out", str(tmp_path / "x")],
    )
    assert result.exit_code == 1
    assert "'restore'" in result.output
