"""Bad input to ``gndgl train --workers``: exit 2, a clear message, no traceback, no worker left."""

from __future__ import annotations

import socket

import pytest

from dist_helpers import DATA, DIST, gndgl, workers_alive

pytestmark = DIST


def test_zero_workers_is_rejected(art, tmp_path):
    r = gndgl("train", str(art("resnet32_k2g1")), "--workers", "0", "--run-dir", str(tmp_path / "r"), *DATA)
    assert r.returncode == 2 and "Traceback" not in r.out, r.out[-2000:]
    assert "--workers" in r.out


def test_more_workers_than_partitions_is_rejected(art, tmp_path):
    r = gndgl("train", str(art("resnet32_k2g1")), "--workers", "3", "--run-dir", str(tmp_path / "r"), *DATA)
    assert r.returncode == 2, r.out[-2000:]
    assert "Traceback" not in r.out
    assert "--workers 3 is more than the 2 partitions" in r.out and "--workers 2" in r.out
    assert not (tmp_path / "r").exists() and not workers_alive(str(tmp_path / "r"))


@pytest.fixture(scope="module")
def busy_port_run(art, tmp_path_factory):
    run = tmp_path_factory.mktemp("port") / "r"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = gndgl("train", str(art("resnet32_k2g1")), "--workers", "2", "--port", str(port), "--run-dir", str(run),
                  *DATA)
    return port, r, run


def test_busy_port_is_reported(busy_port_run):
    port, r, run = busy_port_run
    assert r.returncode != 0
    assert f"port {port} is in use" in r.out and "--port" in r.out
    assert "Traceback" not in r.out
    assert not workers_alive(str(run)) and not run.exists()


def test_busy_port_exits_2(busy_port_run):
    assert busy_port_run[1].returncode == 2
