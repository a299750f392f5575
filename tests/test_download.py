"""`dvc repro` downloading mnist.npz over real HTTP (DVC's http remote) from a server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from conftest import BIN, fake_mnist, run_in, write_npz

from mnistlab.data.mnist_files import sha256_of


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that hang up early are not news
        pass


def _serve(handler_cls, **handler_kwargs) -> tuple[str, list[tuple[str, str]], callable]:
    """Start `handler_cls` on a free loopback port; returns the base URL, the request log and a stop()."""
    requests: list[tuple[str, str]] = []

    class Logged(handler_cls):
        def log_message(self, *args):  # keep pytest output clean; record instead
            pass

        def log_request(self, code="-", size="-"):
            requests.append((self.command, self.path))

    server = _Server(("127.0.0.1", 0), functools.partial(Logged, **handler_kwargs))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(5)

    return f"http://127.0.0.1:{server.server_address[1]}", requests, stop


@pytest.fixture
def http_dir():
    """serve(folder) -> (url, request log) for a static file server over `folder`; stopped after the test."""
    stops = []

    def serve(folder: Path):
        url, log, stop = _serve(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        stops.append(stop)
        return url, log

    yield serve
    for stop in stops:
        stop()


def prepare(proj: Path, url: str) -> None:
    """Verification off and a small validation split (the data is not MNIST); the remote pointed at `url`."""
    p = run_in(proj, sys.executable, "-m", "mnistlab.params", "data.verify_checksums=false", "data.val_size=100")
    assert p.returncode == 0, p.stderr
    p = run_in(proj, str(BIN / "dvc"), "remote", "modify", "--local", "mnist-source", "url", url)
    assert p.returncode == 0, p.stderr


def repro(proj: Path) -> subprocess.CompletedProcess:
    return run_in(proj, str(BIN / "dvc"), "repro", "preprocess")


def test_repro_downloads_over_http(project_copy, tmp_path, http_dir):
    arrays = fake_mnist()
    served = write_npz(tmp_path / "www", arrays)
    url, requests = http_dir(tmp_path / "www")
    prepare(project_copy, url)

    proc = repro(project_copy)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert ("GET", "/mnist.npz") in requests, requests  # it really came over HTTP
    raw = project_copy / "data" / "raw" / "mnist.npz"
    assert raw.read_bytes() == served.read_bytes()
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    data_dvc = yaml.safe_load((project_copy / "data.dvc").read_text())
    assert data_dvc["outs"][0]["md5"] == md5
    meta = json.loads((project_copy / "data" / "processed" / "meta.json").read_text())
    assert meta["counts"] == {"train": 500, "val": 100, "test": 200}
    assert meta["content_sha256"] == {k: sha256_of(v) for k, v in arrays.items()}

    # Nothing changed at the server: the next repro asks the server (to see that) but re-imports nothing
    # and runs nothing.
    requests.clear()
    before = raw.stat()
    again = repro(project_copy)
    out2 = again.stdout + again.stderr
    assert again.returncode == 0, out2
    assert requests, "DVC did not check the remote for changes"
    assert "'data.dvc' didn't change, skipping" in out2, out2
    assert "Stage 'preprocess' didn't change, skipping" in out2, out2
    assert "Importing" not in out2 and "Running stage" not in out2, out2
    after = raw.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_truncated_file_on_server_fails_preprocess(project_copy, tmp_path, http_dir):
    """A server that serves a cut-off file (consistently, with a matching length) gets past the import;
    the preprocess stage must reject it and write nothing."""
    good = write_npz(tmp_path / "good", fake_mnist())
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "mnist.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    url, requests = http_dir(tmp_path / "www")
    prepare(project_copy, url)
    lock_before = _lock(project_copy)

    proc = repro(project_copy)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert ("GET", "/mnist.npz") in requests, requests
    assert "failed to reproduce 'preprocess'" in out, out
    assert "mnist.npz is not a readable .npz archive" in out and "truncated" in out, out
    assert "dvc update data.dvc" in out, out
    assert "Traceback" not in out, out
    assert not (project_copy / "data" / "processed").exists()
    assert sorted(p.name for p in (project_copy / "data").iterdir()) == ["raw"]  # no temp dirs either
    assert _lock(project_copy) == lock_before, "a failed stage must not be recorded in dvc.lock"


def _lock(repo: Path) -> str | None:
    return (repo / "dvc.lock").read_text() if (repo / "dvc.lock").exists() else None


class _CutShortHandler(http.server.BaseHTTPRequestHandler):
    """Announces the whole file's Content-Length, then sends half of it and hangs up."""

    payload = b""

    def _headers(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()

    def do_HEAD(self):
        self._headers()

    def do_GET(self):
        self._headers()
        try:
            self.wfile.write(self.payload[: len(self.payload) // 2])
            self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True


def test_download_cut_short_fails_the_import(project_copy, tmp_path):
    """An interrupted transfer (fewer bytes than Content-Length) fails in DVC's import, before preprocess."""
    good = write_npz(tmp_path / "good", fake_mnist())
    handler = type("Handler", (_CutShortHandler,), {"payload": good.read_bytes()})
    url, requests, stop = _serve(handler)
    try:
        prepare(project_copy, url)
        proc = repro(project_copy)
    finally:
        stop()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert ("GET", "/mnist.npz") in requests, requests
    assert "failed to reproduce 'data.dvc'" in out, out
    assert "content length" in out.lower(), out
    assert "Running stage 'preprocess'" not in out, out
    assert not (project_copy / "data" / "raw" / "mnist.npz").exists()
    assert not (project_copy / "data" / "processed").exists()


def test_missing_file_on_server_fails_the_import(project_copy, tmp_path, http_dir):
    (tmp_path / "www").mkdir()
    url, requests = http_dir(tmp_path / "www")
    prepare(project_copy, url)
    proc = repro(project_copy)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert any(path == "/mnist.npz" for _, path in requests), requests
    assert "failed to reproduce 'data.dvc'" in out, out
    assert "remote://mnist-source/mnist.npz" in out and "does not exist" in out, out
    assert not (project_copy / "data" / "processed").exists()
