"""CLI behaviour that needs no training: bad input is refused cleanly, and `polyfid ui` serves MLflow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dist_utils import free_port
from polyfid.launch.cli import main


def test_ingest_error_names_file_and_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.extxyz"
    bad.write_text("3\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH 0 0 0.7\n")  # truncated frame
    out = tmp_path / "s.zarr"
    rc = main(["ingest", str(bad), "--out", str(out), "--dataset", "d", "--energy", "lo=energy", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.extxyz" in err
    assert not out.exists()


def test_pretrain_with_unknown_key_is_a_config_error(capsys):
    rc = main(["pretrain", "--config", "launch/recipes/demo.yaml", "--set", "trainer.stepz=3"])
    assert rc == 2
    assert "trainer.stepz" in capsys.readouterr().err


def _port_free(port: int) -> bool:
    """No server listens on the port. SO_REUSEADDR: a connection the server closed stays in TIME_WAIT on the port
    for a minute after the server is gone, which a plain bind would take for a live server."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_ui_serves_the_dashboard_and_sigterm_ends_its_server(tmp_path):
    """`polyfid ui` serves MLflow; a SIGTERM to polyfid alone (not its process group) ends the server too and frees
    the port (its `mlflow server` child used to outlive it and keep the port)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyfid.launch.cli", "ui", "--port", str(port),
         "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline, status = time.time() + 300, None  # MLflow server start took >120 s at load average 15
        while time.time() < deadline and status is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                time.sleep(1)
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.time() + 30
        while time.time() < deadline and not _port_free(port):
            time.sleep(0.5)
        assert _port_free(port), "the MLflow server outlived `polyfid ui`"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
