"""Official files by name or URL (star/downloads.py), against an HTTP server on 127.0.0.1 only."""
import hashlib
import http.server
import json
import socket
import threading

import numpy as np
import pytest

from star import downloads
from star.downloads import DownloadError, OfficialFile, fetch_file

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` (path -> bytes) with Range support; records each request's Range header."""

    def do_GET(self):  # noqa: N802 (the http.server hook's name)
        server = self.server
        server.ranges.append(self.headers.get("Range"))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and server.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.ranges, httpd.honour_range = {"/files/data.bin": PAYLOAD}, [], True
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _register(monkeypatch, name: str, url: str, sha256: str | None) -> None:
    monkeypatch.setitem(downloads.OFFICIAL_FILES, name, OfficialFile(name, url, "a test file", sha256=sha256))


def test_a_url_is_downloaded_once_into_the_cache_and_its_sum_recorded(server, tmp_path):
    url = server.base + "/files/data.bin"
    path = fetch_file(url, "--ref", tmp_path / "cache", progress=False)
    assert open(path, "rb").read() == PAYLOAD
    assert path.endswith("/data.bin") and path.startswith(str(tmp_path / "cache" / "url-"))
    record = json.loads(open(path + ".sha256.json").read())
    assert record["sha256"] == hashlib.sha256(PAYLOAD).hexdigest() and record["url"] == url
    assert fetch_file(url, "--ref", tmp_path / "cache", progress=False) == path
    assert len(server.ranges) == 1  # the second use is served from the cache


def test_a_listed_name_downloads_from_its_url_and_is_checked(server, tmp_path, monkeypatch):
    _register(monkeypatch, "vq_test.pt", server.base + "/files/data.bin", hashlib.sha256(PAYLOAD).hexdigest())
    path = fetch_file("vq_test.pt", "--vq-ckpt", tmp_path, progress=False)
    assert path == str(tmp_path / "vq_test.pt") and open(path, "rb").read() == PAYLOAD
    # the default cache: $STAR_CACHE
    monkeypatch.setenv("STAR_CACHE", str(tmp_path / "star-cache"))
    assert fetch_file("vq_test.pt", "--vq-ckpt", progress=False) == str(tmp_path / "star-cache" / "vq_test.pt")


def test_default_cache_is_star_cache_else_xdg_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert downloads.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("STAR_CACHE")
    assert downloads.default_cache_dir() == tmp_path / "xdg" / "star"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert downloads.default_cache_dir() == tmp_path / "home" / ".cache" / "star"


def test_a_partial_download_is_resumed_with_a_range_request(server, tmp_path, monkeypatch):
    _register(monkeypatch, "c2i_test.pt", server.base + "/files/data.bin", hashlib.sha256(PAYLOAD).hexdigest())
    (tmp_path / "c2i_test.pt.part").write_bytes(PAYLOAD[:3000])
    path = fetch_file("c2i_test.pt", "--ckpt", tmp_path, progress=False)
    assert server.ranges == ["bytes=3000-"]
    assert open(path, "rb").read() == PAYLOAD and not (tmp_path / "c2i_test.pt.part").exists()


def test_a_server_that_ignores_range_gives_the_whole_file_again(server, tmp_path):
    server.honour_range = False
    url = server.base + "/files/data.bin"
    target = downloads.wanted_file(url, tmp_path).path
    target.parent.mkdir(parents=True)
    target.with_name("data.bin.part").write_bytes(b"stale bytes that must not stay in front")
    assert open(fetch_file(url, "--ref", tmp_path, progress=False), "rb").read() == PAYLOAD


def test_a_complete_part_is_finished_without_downloading_again(server, tmp_path, monkeypatch):
    _register(monkeypatch, "whole.pt", server.base + "/files/data.bin", None)
    (tmp_path / "whole.pt.part").write_bytes(PAYLOAD)
    assert open(fetch_file("whole.pt", "--ckpt", tmp_path, progress=False), "rb").read() == PAYLOAD
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]  # answered 416 with the full size: nothing more to fetch


def test_a_wrong_sum_is_refused_and_the_file_not_kept(server, tmp_path, monkeypatch):
    _register(monkeypatch, "bad.pt", server.base + "/files/data.bin", "0" * 64)
    with pytest.raises(DownloadError, match="expected 0000") as error:
        fetch_file("bad.pt", "--ckpt", tmp_path, progress=False)
    assert server.base + "/files/data.bin" in str(error.value)
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.pt.part").exists()


def test_a_cached_file_that_changed_since_its_download_is_refused(server, tmp_path):
    url = server.base + "/files/data.bin"
    path = fetch_file(url, "--ref", tmp_path, progress=False)
    with open(path, "r+b") as handle:
        handle.write(b"\xff\xff")  # same size, new modification time: hashed again
    with pytest.raises(DownloadError, match="delete it"):
        fetch_file(url, "--ref", tmp_path, progress=False)


def test_offline_is_one_line_naming_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/c2i_B_256.pt"
    _register(monkeypatch, "c2i_B_256.pt", url, None)
    with pytest.raises(DownloadError) as error:
        fetch_file("c2i_B_256.pt", "--ckpt", tmp_path, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--ckpt c2i_B_256.pt: cannot download " + url)
    assert f"put it at {tmp_path / 'c2i_B_256.pt'}" in message
    assert isinstance(error.value, FileNotFoundError)  # a user error: the commands print it as one line, exit 2


def test_local_paths_and_other_values_are_left_as_they_are(tmp_path, monkeypatch):
    local = tmp_path / "c2i_B_256.pt"
    local.write_bytes(b"mine")
    monkeypatch.chdir(tmp_path)
    # a file of a listed name in the working directory is that file, never a download
    assert fetch_file("c2i_B_256.pt", "--ckpt", tmp_path / "cache") == "c2i_B_256.pt"
    assert fetch_file(str(local), "--ckpt", tmp_path / "cache") == str(local)
    assert fetch_file("missing/c2i_B_256.pt", "--ckpt", tmp_path / "cache") == "missing/c2i_B_256.pt"
    assert fetch_file("", "--vq-ckpt") == "" and fetch_file(None, "--inception") is None
    assert not (tmp_path / "cache").exists()


def test_every_listed_file_has_an_https_url_ending_in_its_name():
    for name, entry in downloads.OFFICIAL_FILES.items():
        assert entry.name == name and entry.url.startswith("https://") and entry.url.endswith("/" + name)
        assert entry.sha256 is None or len(entry.sha256) == 64


def test_sampling_takes_an_official_checkpoint_by_name(server, tmp_path, fixtures_dir, monkeypatch):
    from safetensors.torch import load_file

    from star.eval.sample import SampleConfig, run_sampling
    from star.gpt.generate import SamplingSettings

    server.files["/hub/c2i_small.pt"] = (fixtures_dir / "gpt_small.pt").read_bytes()
    _register(monkeypatch, "c2i_small.pt", server.base + "/hub/c2i_small.pt", None)
    reference = load_file(fixtures_dir / "gpt_small_io.safetensors")
    classes = ",".join(str(int(c)) for c in reference["sample_classes"])
    run_sampling(SampleConfig(ckpt="c2i_small.pt", model=str(fixtures_dir / "gpt_small.json"), out=str(tmp_path / "s"),
                              tokens_only=True, sampling=SamplingSettings(cfg_scale=2.0, top_k=1), classes=classes,
                              num_samples=4, batch_size=4, save_tokens=str(tmp_path / "t.npy"), progress=False,
                              download_dir=str(tmp_path / "cache")))
    assert np.array_equal(np.load(tmp_path / "t.npy"), reference["greedy_tokens_cfg2"].numpy())
    assert (tmp_path / "cache" / "c2i_small.pt").is_file()


def test_tokenizer_takes_a_vq_checkpoint_by_url(server, tmp_path, small_vq):
    import torch

    from star.data.extract import TokenizeConfig, _load_encoder

    server.files["/hub/vq_small.pt"] = small_vq[0].read_bytes()
    config = TokenizeConfig(data="unused", out="unused", vq_ckpt=server.base + "/hub/vq_small.pt",
                            vq_config=str(small_vq[1]), download_dir=str(tmp_path), progress=False)
    encoder = _load_encoder(config, torch.device("cpu"))
    assert encoder.tokenizer["checkpoint"].startswith(str(tmp_path))
    assert encoder.tokenizer["checkpoint_sha256"] == hashlib.sha256(small_vq[0].read_bytes()).hexdigest()


def test_fid_takes_the_reference_and_inception_by_name(server, tmp_path, monkeypatch):
    from star.eval import metrics

    for name in ("VIRTUAL_test.npz", "inception-test.pt"):
        server.files[f"/ref/{name}"] = name.encode() * 10
        _register(monkeypatch, name, f"{server.base}/ref/{name}", hashlib.sha256(name.encode() * 10).hexdigest())
    seen = {}
    monkeypatch.setattr(metrics, "compute_metrics", lambda samples, ref, options: seen.update(
        ref=ref, inception=options.inception_path) or {"fid": 1.0})
    (tmp_path / "samples.npz").write_bytes(b"stand-in: compute_metrics is replaced")
    metrics.run_fid(metrics.FidConfig(samples=str(tmp_path / "samples.npz"), ref="VIRTUAL_test.npz",
                                      inception="inception-test.pt", download_dir=str(tmp_path / "cache")))
    assert seen == {"ref": str(tmp_path / "cache" / "VIRTUAL_test.npz"),
                    "inception": str(tmp_path / "cache" / "inception-test.pt")}
    assert (tmp_path / "cache" / "VIRTUAL_test.npz").read_bytes() == b"VIRTUAL_test.npz" * 10


def test_readme_lists_every_official_file_with_its_link():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, entry in downloads.OFFICIAL_FILES.items():
        assert f"[`{name}`]({entry.url})" in readme, f"README's table of official files lacks {name}"


def test_a_second_process_waits_for_the_first_ones_download(server, tmp_path, monkeypatch):
    from star.lock import folder_lock

    monkeypatch.setattr(downloads, "LOCK_POLL_S", 0.05)
    _register(monkeypatch, "shared.pt", server.base + "/files/data.bin", None)
    result = {}
    with folder_lock(tmp_path / ".locks" / "shared.pt", "the other process's download"):
        waiter = threading.Thread(target=lambda: result.update(path=fetch_file("shared.pt", "--ckpt", tmp_path,
                                                                                 progress=False)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and server.ranges == []  # waiting, not downloading beside the holder
        (tmp_path / "shared.pt").write_bytes(PAYLOAD)  # what the holder's download leaves
    waiter.join(timeout=10)
    assert result["path"] == str(tmp_path / "shared.pt") and server.ranges == []  # used, not fetched again
