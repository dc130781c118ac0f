"""Asymmetric tokens, key rotation and the revocation list (edgefl.auth.keys/revocation)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jwt
import pytest

from edgefl.auth.keys import KeyDir, KeyDirError, PublicKeys
from edgefl.auth.revocation import RevocationError, RevocationList, revoke_subject, revoke_token
from edgefl.auth.tokens import AuthConfig, AuthError, Role, TokenIssuer, TokenVerifier


def _bump_mtime(path: Path) -> None:
    # mtime granularity can hide a rewrite within the same tick; readers key on mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_asymmetric_token_round_trip_and_claims(tmp_path: Path, alg: str) -> None:
    keys = KeyDir(tmp_path / "keys")
    kid = keys.init(alg)
    auth = AuthConfig(keys=str(keys.path))
    token = auth.issuer().issue("dev-1", Role.device, "p", "eu")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": kid, "typ": "JWT"}
    claims = auth.verifier(project="p").verify(token)
    assert (claims.subject, claims.role, claims.project, claims.region) == (
        "dev-1",
        Role.device,
        "p",
        "eu",
    )
    assert claims.token_id and len(claims.token_id) == 32
    assert claims.issued_at is not None and abs(claims.issued_at - time.time()) < 5
    # a verifier-only host holds jwks.json alone: no private key anywhere near it
    verifier_only = AuthConfig(keys=str(keys.jwks_path))
    assert verifier_only.verifier().verify(token).subject == "dev-1"
    with pytest.raises(KeyDirError, match=r"signing key|active key"):
        verifier_only.issuer()
    assert "PRIVATE" not in keys.jwks_path.read_text()
    assert (keys.path / "private" / f"{kid}.pem").stat().st_mode & 0o077 == 0


def test_rotation_overlap_then_retire(tmp_path: Path) -> None:
    keys = KeyDir(tmp_path)
    old = keys.init()
    old_token = AuthConfig(keys=str(tmp_path)).issuer().issue("c", Role.combiner, "p", "eu")
    verifier = TokenVerifier(public_keys=PublicKeys(keys.jwks_path, reload_s=0))
    new = keys.rotate()
    assert new != old and keys.active_kid() == new and keys.key_ids() == [old, new]
    new_token = AuthConfig(keys=str(tmp_path)).issuer().issue("c", Role.combiner, "p", "eu")
    assert jwt.get_unverified_header(new_token)["kid"] == new
    _bump_mtime(keys.jwks_path)
    # during the overlap both verify, without rebuilding the verifier
    assert verifier.verify(old_token).subject == verifier.verify(new_token).subject == "c"
    with pytest.raises(KeyDirError, match="active key"):
        keys.retire(new)
    keys.retire(old)
    _bump_mtime(keys.jwks_path)
    with pytest.raises(AuthError, match="unknown or retired key"):
        verifier.verify(old_token)
    assert verifier.verify(new_token).subject == "c"


def test_attacks_on_the_algorithm_are_refused(tmp_path: Path) -> None:
    keys = KeyDir(tmp_path)
    kid = keys.init("EdDSA")
    verifier = AuthConfig(keys=str(tmp_path)).verifier()
    claims = {"iss": "edgefl", "sub": "d", "role": "admin", "project": "p", "exp": time.time() + 60}
    # alg=none
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    with pytest.raises(AuthError):
        verifier.verify(unsigned)
    # HS256 signed with the *public* key (the classic confusion attack)
    public_x = json.loads(keys.jwks_path.read_text())["keys"][0]["x"]
    forged = jwt.encode(claims, public_x * 2, algorithm="HS256", headers={"kid": kid})
    with pytest.raises(AuthError, match="does not match"):
        verifier.verify(forged)
    # a key pair the verifier never saw, with a reused kid
    other = KeyDir(tmp_path / "other")
    other.init("EdDSA")
    foreign = TokenIssuer(signing_key=other.signing_key()).issue("d", Role.admin, "p")
    foreign_same_kid = jwt.encode(
        jwt.decode(foreign, options={"verify_signature": False}),
        other.signing_key().key,
        algorithm="EdDSA",
        headers={"kid": kid},
    )
    with pytest.raises(AuthError, match="signature"):
        verifier.verify(foreign_same_kid)
    # a token for another project
    token = AuthConfig(keys=str(tmp_path)).issuer().issue("d", Role.viewer, "other-project")
    with pytest.raises(AuthError, match="project"):
        AuthConfig(keys=str(tmp_path)).verifier(project="p").verify(token)


def test_revocation_by_subject_and_by_token(tmp_path: Path) -> None:
    auth = AuthConfig(secret="s" * 40, revocations=str(tmp_path / "revoked.json"))
    issuer = auth.issuer()
    verifier = auth.verifier()
    assert verifier.revocations is not None
    verifier.revocations.reload_s = 0
    t1 = issuer.issue("dev-1", Role.device, "p", "eu")
    t2 = issuer.issue("dev-2", Role.device, "p", "eu")
    c1 = verifier.verify(t1)
    revoke_subject(tmp_path / "revoked.json", "dev-1")
    with pytest.raises(AuthError, match="revoked"):
        verifier.verify(t1)
    assert verifier.still_valid(c1) == "token revoked"  # the broker's live-connection check
    assert verifier.verify(t2).subject == "dev-2"
    # re-provisioning after the revocation issues a newer token, which is accepted
    assert verifier.verify(issuer.issue("dev-1", Role.device, "p", "eu")).subject == "dev-1"
    c2 = verifier.verify(t2)
    assert c2.token_id is not None
    revoke_token(tmp_path / "revoked.json", c2.token_id, c2.expires)
    with pytest.raises(AuthError, match="revoked"):
        verifier.verify(t2)


def test_expiry_is_checked_on_live_claims() -> None:
    verifier = TokenVerifier("s" * 40, leeway_s=0)
    claims = verifier.verify(TokenIssuer("s" * 40).issue("d", Role.device, "p", "eu", ttl_s=60))
    assert verifier.still_valid(claims) is None
    assert verifier.still_valid(claims, now=time.time() + 120) == "token expired"


def test_malformed_revocation_list_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    path.write_text("{not json")
    with pytest.raises(RevocationError, match="not JSON"):
        RevocationList(path)
    revoke_path = tmp_path / "ok.json"
    revoke_subject(revoke_path, "dev-9")
    rl = RevocationList(revoke_path, reload_s=0)
    assert rl.revoked("dev-9", None, time.time() - 10)
    revoke_path.write_text('{"version": 1, "subjects": "oops"}')
    _bump_mtime(revoke_path)
    # a broken rewrite keeps the last good list instead of re-admitting everyone
    assert rl.revoked("dev-9", None, time.time() - 10)


def test_config_refuses_ambiguity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AuthConfig()
    with pytest.raises(ValueError, match="exactly one"):
        AuthConfig(secret="s" * 40, keys=str(tmp_path))
    with pytest.raises(ValueError, match="at least 32"):
        AuthConfig(secret="short")
    monkeypatch.setenv("EDGEFL_JWT_SECRET", "s" * 40)
    monkeypatch.setenv("EDGEFL_JWT_KEYS", str(tmp_path))
    with pytest.raises(ValueError, match="only one"):
        AuthConfig.from_env()
    monkeypatch.delenv("EDGEFL_JWT_SECRET")
    monkeypatch.delenv("EDGEFL_JWT_KEYS")
    assert AuthConfig.from_env() is None
    with pytest.raises(KeyDirError, match="cannot read"):
        AuthConfig(keys=str(tmp_path / "missing")).verifier()
