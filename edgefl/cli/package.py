"""`edgefl package`: build, inspect and verify model packages, and make signing keys.

Mounted into the main CLI with ``app.add_typer(package_app, name="package")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefl.packages.format import DEFAULT_MAX_SIZE, ModelPackage, PackageError

package_app = typer.Typer(
    help="Model packages: build one from an exported .onnx/.tflite model, inspect it, verify "
    "its digests and signature, and generate Ed25519 signing keys. Format: docs/model-package.md.",
    no_args_is_help=True,
    add_completion=False,
)

MaxSize = typer.Option(DEFAULT_MAX_SIZE, "--max-size", min=1, help="refuse larger packages (bytes)")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load_public_key(value: str) -> Any:
    from edgefl.packages.signing import load_public_key, public_key_from_text

    path = Path(value)
    if path.is_file():
        return load_public_key(path)
    try:
        return public_key_from_text(value, "public key")
    except PackageError:
        _fail(f"--public-key {value!r} is neither a key file nor a base64 Ed25519 public key", 2)


def _read(file: Path, max_size: int, **kwargs: Any) -> ModelPackage:
    if not file.is_file():
        _fail(f"{file}: no such file", 2)
    return ModelPackage.read(file, max_size=max_size, **kwargs)


@package_app.command()
def build(
    model: Path = typer.Argument(..., help="the exported model: a .onnx or .tflite file"),
    out: Path = typer.Option(..., "--out", "-o", help="where to write the package"),
    name: str = typer.Option(None, help="package name (default: the model file's stem)"),
    loss: str = typer.Option("cross_entropy", help="cross_entropy (class labels) or mse"),
    optimizer: str = typer.Option(
        None, help="device optimizer: sgd, momentum or adam (default: the builder's, sgd)"
    ),
    lr: float = typer.Option(None, help="learning rate (default 0.1; 0.001 for adam)"),
    momentum: float = typer.Option(0.9, help="momentum coefficient (for --optimizer momentum)"),
    labels: int = typer.Option(None, min=1, help="number of classes, checked on the devices"),
    preprocessing: Path = typer.Option(
        None,
        help="JSON file with the preprocessing map (scale, mean, std, description, x-*)",
    ),
    trainable: list[str] = typer.Option(
        None, "--trainable", help="train only these parameters (repeat); default: the builder's"
    ),
    sign_key: Path = typer.Option(
        None, "--sign-key", help="sign with this private key file (from `keygen`)"
    ),
) -> None:
    """Build a model package from an exported model: training graphs, weights, manifest."""
    from edgefl.packages.build import build_package, optimizer_config

    try:
        pre = None
        if preprocessing is not None:
            try:
                pre = json.loads(preprocessing.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                _fail(f"--preprocessing {preprocessing}: {exc}", 2)
            if not isinstance(pre, dict):
                _fail(f"--preprocessing {preprocessing}: expected a JSON object", 2)
        key = None
        if sign_key is not None:
            from edgefl.packages.signing import load_private_key

            key = load_private_key(sign_key)
        pkg = build_package(
            model,
            name=name,
            loss=loss,
            optimizer=None
            if optimizer is None and lr is None
            else optimizer_config(optimizer or "sgd", lr, momentum),
            labels=labels,
            preprocessing=pre,
            signing_key=key,
            trainable=trainable or None,
        )
        digest = pkg.write(out)
    except (ValueError, OSError) as exc:  # PackageError, builder errors, unreadable files
        _fail(str(exc))
    m = pkg.manifest
    signed = f"signed by key {pkg.signature['key_id']}" if pkg.signature else "unsigned"
    typer.echo(
        f"wrote {out} ({pkg.size} bytes, {m['framework']}, {len(m['parameters'])} parameter "
        f"tensors, {signed})\ndigest sha256:{digest}"
    )


def _shape(shape: list[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _brief(value: Any) -> str:
    """JSON for the table, with long arrays (per-feature means...) shortened to a count."""

    def shorten(v: Any) -> Any:
        if isinstance(v, list) and len(v) > 8:
            return f"<{len(v)} values>"
        if isinstance(v, dict):
            return {k: shorten(x) for k, x in v.items()}
        return v

    return json.dumps(shorten(value), sort_keys=True)


def _spec_rows(table: Table, specs: list[dict[str, Any]]) -> None:
    for spec in specs:
        table.add_row(escape(spec["name"]), spec["dtype"], escape(_shape(spec["shape"])))


@package_app.command()
def inspect(
    file: Path = typer.Argument(..., help="package file"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON instead"),
    max_size: int = MaxSize,
) -> None:
    """Show a package's manifest, files and signer (after checking it; signer not verified)."""
    try:
        pkg = _read(file, max_size)
    except PackageError as exc:
        _fail(f"{file}: {exc}")
    m = pkg.manifest
    sig = pkg.signature
    if as_json:
        doc = {
            "digest": pkg.digest,
            "size": pkg.size,
            "signature": {"alg": sig["alg"], "key_id": sig["key_id"]} if sig else None,
            "manifest": m,
        }
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    console = Console(highlight=False)
    head = Table(title=f"edgefl model package {escape(str(file))}", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value", overflow="fold")
    rows = [
        ("name", m["name"]),
        ("framework", m["framework"]),
        ("format_version", str(m["format_version"])),
        ("created", m["created"]),
        ("digest", f"sha256:{pkg.digest}"),
        ("size", f"{pkg.size} bytes"),
        ("signature", f"ed25519, key {sig['key_id']} (not verified)" if sig else "unsigned"),
        ("loss", m["loss"]),
        ("optimizer", _brief(m["optimizer"])),
        ("labels", _brief(m["labels"])),
        ("preprocessing", _brief(m["preprocessing"])),
        ("weights", m["weights"]),
    ]
    if "ops" in m:
        rows.append(("ops", ", ".join(str(o) for o in m["ops"])))
    for k, v in rows:
        head.add_row(k, escape(v))
    console.print(head)
    for title, specs in (("parameters", m["parameters"]), ("inputs", m["inputs"])):
        t = Table(title=title)
        for col in ("name", "dtype", "shape"):
            t.add_column(col)
        _spec_rows(t, specs)
        console.print(t)
    files = Table(title="files")
    files.add_column("name")
    files.add_column("size", justify="right")
    files.add_column("sha256", overflow="fold")
    for fname, entry in sorted(m["files"].items()):
        files.add_row(escape(fname), str(entry["size"]), entry["sha256"])
    console.print(files)


@package_app.command()
def verify(
    file: Path = typer.Argument(..., help="package file"),
    public_key: list[str] = typer.Option(
        None,
        "--public-key",
        help="trusted Ed25519 public key: a .pub file or the base64 key; repeat for several",
    ),
    require_signature: bool = typer.Option(
        False, "--require-signature", help="refuse an unsigned package (needs --public-key)"
    ),
    max_size: int = MaxSize,
) -> None:
    """Check a package completely; exit 0 when it is good, 1 with the reason when not."""
    if require_signature and not public_key:
        _fail("--require-signature needs at least one --public-key to check against", 2)
    try:
        keys = [_load_public_key(v) for v in public_key or []]
    except (PackageError, OSError) as exc:
        _fail(str(exc), 2)
    try:
        pkg = _read(
            file,
            max_size,
            trusted_keys=keys or None,
            require_signature=require_signature,
        )
    except PackageError as exc:
        typer.echo(f"INVALID {file}: {exc}", err=True)
        raise typer.Exit(1) from None
    if pkg.verified_key_id:
        signer = f"signed by trusted key {pkg.verified_key_id}"
    elif pkg.signature:
        signer = f"signature by key {pkg.signature['key_id']} NOT checked (no --public-key)"
    else:
        signer = "UNSIGNED"
    typer.echo(f"OK {file}: sha256:{pkg.digest}, {len(pkg.files)} files match, {signer}")


@package_app.command()
def keygen(
    stem: Path = typer.Argument(..., help="writes STEM.key (private, mode 0600) and STEM.pub"),
    force: bool = typer.Option(False, "--force", help="overwrite existing key files"),
) -> None:
    """Generate an Ed25519 key pair for signing packages; devices get the .pub key."""
    from edgefl.packages.signing import generate_private_key, key_id_of, save_keypair

    key = generate_private_key()
    try:
        priv, pub = save_keypair(key, stem, overwrite=force)
    except OSError as exc:
        _fail(str(exc))
    typer.echo(f"private key {priv} (keep it secret)\npublic key  {pub}\nkey_id {key_id_of(key)}")
