"""Shared pytest fixtures.

Docker fixtures (all named ``docker_*``): a reachable engine or a skip (a
failure when the environment variable CI is set, so CI can never pass by
skipping), the local images built by ``examples/build-images``, a unique spool
label per test whose containers are removed afterwards, and temporary folders
under a path the engine sees (never /tmp: the engine may see another /tmp).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER_IMAGE = "flowd/busybox:latest"
DOCKER_IMAGE_NOBODY = "flowd/busybox-nobody:latest"  # same, with USER 65534


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "swarm: needs a one-node Docker Swarm (inits one on the engine and leaves it "
                   "again, or uses the swarm the engine is in); select with -m swarm")


def docker_test_root() -> str:
    """Where Docker tests make their folders: $FLOWD_TEST_DIR or <repo>/.test-tmp."""
    root = os.environ.get("FLOWD_TEST_DIR") or os.path.join(REPO_ROOT, ".test-tmp")
    os.makedirs(root, exist_ok=True)
    return root


def _docker_unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"Docker engine needed under CI: {why}", pytrace=False)
    pytest.skip(f"no Docker engine: {why}")


@pytest.fixture(scope="session")
def docker_client():
    """A docker SDK client on a reachable engine; skip (or fail under CI) otherwise."""
    try:
        import docker
    except ImportError as e:
        _docker_unavailable(f"the docker SDK is not installed ({e})")
    try:
        client = docker.from_env(version="auto", timeout=30)
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure means "no engine here"
        _docker_unavailable(str(e))
    yield client
    client.close()


@pytest.fixture(scope="session")
def docker_images(docker_client):
    """Build flowd/busybox (examples/build-images) and flowd/busybox-nobody."""
    script = os.path.join(REPO_ROOT, "examples", "build-images")
    proc = subprocess.run([script], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"examples/build-images failed:\n{proc.stdout}{proc.stderr}", pytrace=False)
    try:
        docker_client.api.inspect_image(DOCKER_IMAGE_NOBODY)
    except Exception:  # noqa: BLE001 - not there yet: make it
        cid = docker_client.api.create_container(DOCKER_IMAGE, ["true"])["Id"]
        try:
            repo, tag = DOCKER_IMAGE_NOBODY.rsplit(":", 1)
            docker_client.api.commit(cid, repository=repo, tag=tag, changes=["USER 65534"])
        finally:
            docker_client.api.remove_container(cid, force=True)
    return {"root": DOCKER_IMAGE, "nobody": DOCKER_IMAGE_NOBODY}


@pytest.fixture
def docker_spool(docker_client):
    """A spool label unique to the test; its containers are removed afterwards."""
    spool = "pytest-" + uuid.uuid4().hex[:10]
    yield spool
    for c in docker_client.api.containers(all=True, filters={"label": [f"io.flowd.spool={spool}"]}):
        try:
            docker_client.api.remove_container(c["Id"], force=True)
        except Exception:  # noqa: BLE001 - gone already
            pass


@pytest.fixture
def docker_tmp():
    """A fresh folder the engine can bind-mount (under docker_test_root())."""
    path = os.path.join(docker_test_root(), "docker-" + uuid.uuid4().hex[:10])
    os.makedirs(path)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# The daemon fixtures (a real flowd in a subprocess) live in daemon_fixtures.py.
from daemon_fixtures import daemon, daemon_factory, workdir  # noqa: E402,F401


@pytest.fixture(scope="session")
def python_image(docker_client):
    """flowd/python:bookworm, made by debootstrap from this machine's Debian mirror."""
    script = os.path.join(REPO_ROOT, "examples", "build-python-image")
    proc = subprocess.run([script], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"examples/build-python-image failed:\n{proc.stdout}{proc.stderr}",
                    pytrace=False)
    return "flowd/python:bookworm"
