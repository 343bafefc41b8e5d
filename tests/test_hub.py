"""Hub in, Hub out, against a real local Hub-compatible server (tests/hub_server.py).

The real huggingface_hub client runs inside the qstream CLI subprocess, pointed at
the server with HF_ENDPOINT (read at import) and its own HF_HOME; nothing here mocks
the client. Pushes run twice: plain LFS (HF_HUB_DISABLE_XET=1) and Xet, where the
server's token endpoints hand out a ``local://`` CAS that hf_xet simulates on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import run_qstream
from hub_server import TOKEN, HubServer, hub_env
from synth import llama_config, llama_tensors, write_checkpoint

# The client behaviour these tests (and qstream.publish.hub, qstream.sources.hub_source) rely on; pinned in pyproject's test extras.
PINNED = {"huggingface_hub": "2.4.0", "hf_xet": "1.8.0"}
SRC_REPO = "org/tiny"
OPTS = ("--mlp", "nvfp4", "--max-shard-size", "1MB")  # NVFP4: fused gate/up partners straddle source shards
SMALL = ("model.safetensors.index.json", "config.json", "tokenizer_config.json", "generation_config.json")


def _xet_available() -> bool:
    try:
        import hf_xet  # noqa: F401
        return True
    except ImportError:
        return False


MODES = ["lfs", pytest.param("xet", marks=pytest.mark.skipif(not _xet_available(), reason="hf_xet not installed"))]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


@pytest.fixture(scope="module")
def src_ckpt(tmp_path_factory) -> Path:
    """8 layers in 4 source shards (2.4-3.3 MB each), so disk bounds and overlap are real."""
    cfg = llama_config(hidden=256, inter=512, layers=8, vocab=1024)
    root = tmp_path_factory.mktemp("hubsrc") / "src"
    return write_checkpoint(root, cfg, llama_tensors(cfg), n_shards=4, extra_files={
        "tokenizer_config.json": '{"model_max_length": 256}',
        "generation_config.json": '{"do_sample": false}',
        "README.md": "---\nlicense: apache-2.0\n---\n# tiny\n",
    })


@pytest.fixture(scope="module")
def hub(src_ckpt, tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hubroot")) as srv:
        srv.state.seed(SRC_REPO, src_ckpt)
        srv.state.seed("org/broken", src_ckpt, skip=("model-00002-of-00004.safetensors",))
        yield srv


@pytest.fixture(autouse=True)
def _clean_faults(request):
    yield
    if "hub" in request.fixturenames:
        request.getfixturevalue("hub").state.reset_faults()


@pytest.fixture(scope="module")
def reference(src_ckpt, tmp_path_factory) -> Path:
    """The same conversion from the local folder: what every Hub run must reproduce."""
    dst = tmp_path_factory.mktemp("ref") / "out"
    run_qstream("convert", src_ckpt, dst, *OPTS, "-q", check=True)
    return dst


def assert_matches_reference(files: dict[str, tuple[int, str]], reference: Path) -> None:
    """``files``: path -> (size, sha256) as the Hub (or a folder) holds them."""
    ref = {p.name: p for p in reference.iterdir() if p.is_file() and p.name != "README.md"}
    got = {k: v for k, v in files.items() if k not in (".gitattributes", "README.md")}
    assert sorted(got) == sorted(ref)
    for name, p in ref.items():
        size, digest = got[name]
        assert size == p.stat().st_size, name
        if name.endswith(".safetensors"):
            assert digest == sha256(p), name
        else:  # regular file: git blob oid
            data = p.read_bytes()
            assert digest == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), name


def folder_files(d: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for p in d.iterdir():
        if p.is_file():
            data = p.read_bytes()
            digest = hashlib.sha256(data).hexdigest() if p.name.endswith(".safetensors") else \
                hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            out[p.name] = (len(data), digest)
    return out


def card_yaml(text: str) -> str:
    assert text.startswith("---\n"), text[:200]
    return text[4: text.index("\n---", 4)]


# --------------------------------------------------------------------------- source


def test_pinned_client_versions():
    import huggingface_hub

    assert huggingface_hub.__version__ == PINNED["huggingface_hub"], "tests/hub_server.py follows huggingface_hub 2.4.0"
    if _xet_available():
        from importlib.metadata import version

        assert version("hf_xet") == PINNED["hf_xet"]


def test_server_speaks_the_client_protocol(hub, tmp_path):
    """The endpoints the CLI does not exercise, driven by the real client in-process."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.whoami()["name"] == "tester"
    assert api.create_repo("proto", exist_ok=True).repo_id == "tester/proto"
    assert api.create_repo("tester/proto", exist_ok=True).repo_id == "tester/proto"  # 409 -> url
    tree = {f.path: f for f in api.list_repo_tree(SRC_REPO, recursive=True)}
    shard = "model-00001-of-00004.safetensors"
    want = hashlib.sha256(hub.state.read(SRC_REPO, shard)).hexdigest()
    assert tree[shard].lfs.sha256 == want and tree["config.json"].lfs is None
    url = hf_hub_url(SRC_REPO, shard, endpoint=hub.url)
    meta = get_hf_file_metadata(url, token=TOKEN)
    assert meta.etag == want and meta.commit_hash == hub.state.repos[SRC_REPO].branches["main"]
    r = get_session().get(url, headers={**build_hf_headers(token=TOKEN), "Range": "bytes=0-7"})
    assert r.status_code == 206 and r.content == hub.state.read(SRC_REPO, shard)[:8]
    p = hf_hub_download(SRC_REPO, "config.json", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path)
    assert Path(p).read_bytes() == hub.state.read(SRC_REPO, "config.json")


def test_inspect_reads_only_headers(hub, src_ckpt, tmp_path):
    before_full = len(hub.state.stats.full_gets)
    p = run_qstream("inspect", SRC_REPO, *OPTS, "--json", env=hub_env(hub, tmp_path / "home"), check=True)
    local = run_qstream("inspect", src_ckpt, *OPTS, "--json", check=True)
    got, want = json.loads(p.stdout), json.loads(local.stdout)
    assert got["source"].startswith(SRC_REPO + "@")
    got.pop("source"), want.pop("source")
    assert got == want
    new_full = hub.state.stats.full_gets[before_full:]
    assert not [f for f in new_full if f.endswith(".safetensors")], new_full  # no shard bytes downloaded
    shard_reads = [r for r in hub.state.stats.range_gets if r[0].endswith(".safetensors")]
    assert {f for f, _ in shard_reads} >= {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)}
    assert not list((tmp_path / "home").rglob("*.safetensors"))


def test_revision_and_unknown_repo(hub, tmp_path):
    env = hub_env(hub, tmp_path / "home")
    commit = hub.state.repos[SRC_REPO].branches["main"]
    p = run_qstream("inspect", SRC_REPO, "--revision", commit, *OPTS, "--json", env=env, check=True)
    assert json.loads(p.stdout)["source"] == f"{SRC_REPO}@{commit[:10]}"
    p = run_qstream("inspect", SRC_REPO, "--revision", "no-such-branch", env=env)
    assert p.returncode == 2 and "no-such-branch" in p.stderr and "Traceback" not in p.stderr
    p = run_qstream("inspect", "org/does-not-exist", env=env)
    assert p.returncode == 2 and "org/does-not-exist" in p.stderr and "not found" in p.stderr


def test_missing_shard_names_the_file(hub, tmp_path):
    p = run_qstream("convert", "org/broken", tmp_path / "out", *OPTS, env=hub_env(hub, tmp_path / "home"))
    assert p.returncode == 2, p.stderr
    msg = " ".join(p.stderr.split())
    assert "Traceback" not in p.stderr
    assert "org/broken" in msg and "model-00002-of-00004.safetensors" in msg and "not in the repo" in msg
    assert not (tmp_path / "out" / "config.json").exists()


def test_convert_from_hub_then_offline_from_cache(hub, reference, tmp_path):
    home = tmp_path / "home"
    env = hub_env(hub, home)
    run_qstream("convert", SRC_REPO, tmp_path / "out", *OPTS, "-q", env=env, check=True)
    assert_matches_reference(folder_files(tmp_path / "out"), reference)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: apache-2.0" in card_yaml(card)
    # Without --low-disk the source shards stay in the HF cache, usable offline.
    assert len(list(home.rglob("snapshots/*/model-0000?-of-00004.safetensors"))) == 4
    n = len(hub.state.stats.requests)
    run_qstream("convert", SRC_REPO, tmp_path / "offline", *OPTS, "-q", env={**env, "HF_HUB_OFFLINE": "1"}, check=True)
    assert len(hub.state.stats.requests) == n  # not one request
    assert_matches_reference(folder_files(tmp_path / "offline"), reference)


def test_card_names_the_hub_repo_as_base_model(hub, tmp_path):
    run_qstream("convert", SRC_REPO, tmp_path / "out", *OPTS, "-q", env=hub_env(hub, tmp_path / "home"), check=True)
    assert f"base_model: {SRC_REPO}" in card_yaml((tmp_path / "out" / "README.md").read_text())


# --------------------------------------------------------------------------- push


def push_cmd(dst: Path, repo: str, *extra: str, low_disk: bool = True) -> list[str]:
    return ["convert", SRC_REPO, str(dst), *OPTS, *(["--low-disk"] if low_disk else []), "--push-to-hub", repo, *extra]


class DiskSampler:
    """Samples the bytes under a folder from outside the process, every ~2 ms."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak = folder, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(self.folder))
            time.sleep(0.002)

    def __enter__(self) -> "DiskSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


@pytest.mark.parametrize("mode", MODES)
def test_low_disk_push(hub, src_ckpt, reference, tmp_path, mode):
    """--low-disk --push-to-hub: uploads overlap the conversion, one commit at the end with
    exactly the local conversion's bytes, DST keeps only small files, and disk use stays
    under two source shards plus two output shards. LFS also survives a 500 on an upload."""
    repo, dst = f"org/tiny-nvfp4-{mode}", tmp_path / "out"
    hub.state.upload_delay = 0.25  # uploads slower than conversion: the bound must come from pacing
    if mode == "lfs":
        hub.state.fail_puts = 1  # the client must retry
    commits_before = len(hub.state.stats.commits)
    xet_before, puts_before = hub.state.xet_store_bytes(repo), hub.state.stats.put_attempts
    cmd = push_cmd(dst, repo, "--private", "--commit-message", "qstream test push")
    with DiskSampler(dst) as sampler:
        p = run_qstream(*cmd, env=hub_env(hub, tmp_path / "home", mode), check=True)

    # One commit, with the parent recorded at the start, holding exactly the converted files.
    new_commits = hub.state.stats.commits[commits_before:]
    assert len(new_commits) == 1
    header = new_commits[0]["header"]
    assert header["summary"] == "qstream test push" and header.get("parentCommit")
    assert hub.state.repos[repo].private
    files = hub.state.tree(repo)
    assert_matches_reference(files, reference)
    if mode == "lfs":
        assert hub.state.stats.failed_puts == 1
        assert all(hub.state.has_object(repo, files[s.name][1]) for s in reference.glob("*.safetensors"))
        first = sorted(reference.glob("*.safetensors"))[0]
        assert hub.state.read(repo, first.name) == first.read_bytes()
    else:
        assert hub.state.stats.put_attempts == puts_before  # nothing went through LFS
        stored = hub.state.xet_store_bytes(repo) - xet_before
        assert 0.5 * sum(s.stat().st_size for s in reference.glob("*.safetensors")) < stored

    # The card published with it.
    card = hub.state.read(repo, "README.md").decode()
    yaml = card_yaml(card)
    for line in ("base_model_relation: quantized", "license: apache-2.0", "- nvfp4", "- compressed-tensors", "- vllm"):
        assert line in yaml, line
    assert f"vllm serve {repo}" in card

    # Uploads overlapped the conversion: shard 1 was uploaded before the last shard was written.
    out = p.stdout
    shards = sorted(s.name for s in reference.glob("*.safetensors"))
    assert out.index(f"uploaded {shards[0]}") < out.index(f"wrote {shards[-1]}"), out

    # DST keeps only the small files; downloads and uploaded shards are gone.
    assert not list(dst.glob("*.safetensors")) and not (dst / ".cache" / "huggingface" / "qstream" / "downloads").exists()
    assert {p.name for p in dst.iterdir() if p.is_file()} == {*SMALL, "README.md"}

    # Disk bound: about two source shards plus two output shards (plus the small files).
    src_max = max(s.stat().st_size for s in src_ckpt.glob("*.safetensors"))
    out_max = max(s.stat().st_size for s in reference.glob("*.safetensors"))
    small = sum(s.stat().st_size for s in reference.iterdir() if not s.name.endswith(".safetensors"))
    bound = 2 * src_max + 2 * out_max + small + 64 * 1024
    reported = int(re.search(r"peak disk use under .*?\((\d+) bytes\)", " ".join(out.split())).group(1))
    total_src = sum(s.stat().st_size for s in src_ckpt.glob("*.safetensors"))
    print(f"\n[{mode}] disk high-water mark: reported {reported}, sampled {sampler.peak}, bound {bound} "
          f"(source shard max {src_max}, output shard max {out_max}; all source shards {total_src})")
    assert reported <= bound and sampler.peak <= bound
    assert bound < total_src  # the bound is below keeping the whole source


def test_push_needs_a_token(hub, tmp_path):
    p = run_qstream(*push_cmd(tmp_path / "out", "org/never"), env=hub_env(hub, tmp_path / "home", token=False))
    assert p.returncode == 2 and "token" in p.stderr and "Traceback" not in p.stderr
    assert "org/never" not in hub.state.repos and not (tmp_path / "out").exists()


def test_push_to_a_branch_replaces_stale_shards(hub, src_ckpt, reference, tmp_path):
    """Without --low-disk: shards stay in DST; --push-revision creates the branch from main;
    root shards of an earlier upload that the new index does not name are deleted there."""
    repo = "org/tiny-branch"
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"old")
    hub.state.seed(repo, stale)
    run_qstream("convert", SRC_REPO, tmp_path / "out", *OPTS, "--push-to-hub", repo, "--push-revision", "q", "-q",
                env=hub_env(hub, tmp_path / "home"), check=True)
    assert_matches_reference(hub.state.tree(repo, "q"), reference)
    assert "model-00001-of-00009.safetensors" in hub.state.tree(repo, "main")
    assert_matches_reference(folder_files(tmp_path / "out"), reference)


@pytest.mark.parametrize("mode,low_disk", [
    ("lfs", True), ("lfs", False),
    pytest.param("xet", True, marks=pytest.mark.skipif(not _xet_available(), reason="hf_xet not installed")),
])
def test_killed_push_resumes_without_resending(hub, reference, tmp_path, mode, low_disk):
    """SIGKILL in the middle of the push (the third upload hangs), then the same command:
    it ends with the same commit content and sends nothing the Hub already had. With
    --low-disk the uploaded shards were deleted and are converted again; without it the
    journal keeps the finished shards."""
    repo, dst = f"org/tiny-resume-{mode}-{low_disk}", tmp_path / "out"
    env = {**os.environ, "COLUMNS": "200", **hub_env(hub, tmp_path / "home", mode)}
    cmd = [sys.executable, "-m", "qstream", *push_cmd(dst, repo, low_disk=low_disk)]
    st = hub.state
    if mode == "lfs":
        st.hold_puts_after = len(st.stats.puts) + 2
    else:
        st.hold_xet_tokens_after = 2
    log = tmp_path / "run1.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not st.holding.wait(0.05):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        # two uploads run at once (UPLOAD_WORKERS): the held one can start before the second
        # shard's upload ends; that one does not need the held request, so let it finish
        while len(set(re.findall(r"uploaded (\S+\.safetensors)", log.read_text()))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        st.release.set()
    if mode == "lfs":  # the held upload's partial body is counted before the rerun's bytes are
        st.held_done.wait(30)
    first = log.read_text()
    uploaded1 = set(re.findall(r"uploaded (\S+\.safetensors)", first))
    assert len(uploaded1) == 2 and repo in st.repos and len(st.tree(repo)) == 1, first  # nothing committed
    st.reset_faults()

    shard_sizes = {s.name: s.stat().st_size for s in reference.glob("*.safetensors")}
    have = {p.name for p in st.object_path(repo, "x").parent.glob("*")}
    puts_before, bytes_before, xet_before = len(st.stats.puts), st.stats.put_bytes, st.xet_store_bytes(repo)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_matches_reference(st.tree(repo), reference)
    if not low_disk:
        assert "already done (checksum verified), kept" in p.stdout  # the journal kept run 1's shards
    if mode == "lfs":
        # what the Hub lacked after the kill, by content: an upload that finished just before the
        # SIGKILL is on the Hub though run 1 never logged it (uploads run concurrently)
        oid_of = {n: hashlib.sha256((reference / n).read_bytes()).hexdigest() for n in shard_sizes}
        assert {oid_of[n] for n in uploaded1} <= have, (uploaded1, have)
        missing = {n: s for n, s in shard_sizes.items() if oid_of[n] not in have}
        resent = st.stats.put_bytes - bytes_before
        oids = st.stats.puts[puts_before:]
        print(f"\n[lfs, low_disk={low_disk}] rerun uploaded {resent} bytes; shards missing after the kill: "
              f"{sum(missing.values())} bytes")
        assert not set(oids) & have  # nothing the Hub had was sent again
        assert resent == sum(missing.values())
    else:
        missing = {n: s for n, s in shard_sizes.items() if n not in uploaded1}
        stored = st.xet_store_bytes(repo) - xet_before
        print(f"\n[xet] rerun stored {stored} new xorb bytes; shards missing after the kill: "
              f"{sum(missing.values())} bytes, already uploaded: {sum(shard_sizes[n] for n in uploaded1)} bytes")
        assert stored <= sum(missing.values()) + 64 * 1024


def _run_fetcher(hub, tmp_path, low_disk: bool, body: str) -> str:
    """Run ``body`` in a fresh process after ``f = SourceFetcher(...)`` of the source repo (with
    --low-disk's download folder and delete, or the HF cache); its stdout."""
    dl = f"__import__('pathlib').Path({str(tmp_path / 'dl')!r})" if low_disk else "None"
    code = (
        "import threading, time\n"
        "from qstream.sources.hub_source import SourceFetcher, open_hub_checkpoint\n"
        f"ck = open_hub_checkpoint({SRC_REPO!r}, download_dir={dl})\n"
        "order = [s.path for s in ck.shards]\n"
        f"f = SourceFetcher(ck, order, delete={low_disk})\n" + body)
    env = dict(os.environ, **hub_env(hub, tmp_path / "home"))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_prefetch_threads_end_with_close(hub, tmp_path):
    """SourceFetcher.close() returns only when no prefetch thread of it is left running: the
    real client downloads shard 1 on demand and shard 2 in the background, then close()."""
    out = _run_fetcher(hub, tmp_path, True, (
        "f.fetch(order[0])\n"
        "f.close()\n"
        "alive = [t for t in threading.enumerate() if t.name == 'qstream-prefetch']\n"
        "print('PREFETCHED', len(f._threads), 'ALIVE', len(alive))\n"))
    assert "PREFETCHED 1 ALIVE 0" in out, out
    assert not (tmp_path / "dl").exists()  # with delete, close() removed the download folder after the threads ended


@pytest.mark.parametrize("low_disk", [False, True])
def test_prefetch_keeps_the_link_busy(hub, tmp_path, low_disk):
    """With no shard released yet (the executor's threads hold two), the fetcher still downloads
    the next shards into the HF cache, two at a time, each started when one in flight ends;
    with --low-disk (delete) it stops at two unreleased shards on disk."""
    out = _run_fetcher(hub, tmp_path, low_disk, (
        "f.fetch(order[0])\n"
        "end = time.monotonic() + 60\n"
        "while time.monotonic() < end and not (f._futures and all(x.done() for x in f._futures.values())\n"
        "                                      and len(f._futures) >= (2 if f.delete else len(order))):\n"
        "    time.sleep(0.05)\n"
        "time.sleep(0.5)  # nothing more starts\n"
        "print('SHARDS', len(order), 'DOWNLOADED', sum(p.is_file() for p in order), 'THREADS', len(f._threads))\n"
        "f.close()\n"))
    want = "SHARDS 4 DOWNLOADED 2 THREADS 1" if low_disk else "SHARDS 4 DOWNLOADED 4 THREADS 3"
    assert want in out, out


# --------------------------------------------------------------------------- metadata, local pushes


def test_server_validates_metadata_like_the_hub(hub, tmp_path):
    """The real client's create_commit posts README.md to /api/validate-yaml and raises the
    Hub's error; a valid card goes through."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("org/meta-check", exist_ok=True)
    for bad, word in (("base_model: smollm2-bf16", "base_model"), ("base_model: /fsx/alice/ckpt/step-5000", "base_model"),
                      ("license: apache 2", "license")):
        with pytest.raises(ValueError, match=rf"Invalid metadata in README.md.\n- \"{word}\" with value"):
            api.upload_file(path_or_fileobj=f"---\n{bad}\n---\n# x\n".encode(), path_in_repo="README.md",
                            repo_id="org/meta-check")
    api.upload_file(path_or_fileobj=b"---\nbase_model: org/tiny\nbase_model_relation: quantized\nlicense: other\n"
                                    b"license_name: x\nlicense_link: LICENSE\n---\n# x\n",
                    path_in_repo="README.md", repo_id="org/meta-check")
    assert b"org/tiny" in hub.state.read("org/meta-check", "README.md")


@pytest.fixture(scope="module")
def local_named(tmp_path_factory) -> Path:
    """A local checkpoint named like a folder, whose _name_or_path is a training path."""
    cfg = llama_config(hidden=64, inter=128, layers=2)
    cfg["_name_or_path"] = "/fsx/alice/ckpt/step-5000"
    root = tmp_path_factory.mktemp("localpush") / "smollm2-bf16"
    return write_checkpoint(root, cfg, llama_tensors(cfg), n_shards=2, extra_files={
        "README.md": "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# local\n"})


def test_push_from_a_local_folder_end_to_end(hub, local_named, tmp_path):
    env = hub_env(hub, tmp_path / "home")
    p = run_qstream("convert", local_named, tmp_path / "a", "--mlp", "nvfp4", "--push-to-hub", "org/local-a", env=env)
    assert p.returncode == 0, p.stderr
    assert "no base_model" in " ".join(p.stderr.split()) and "--base-model" in p.stderr
    card = hub.state.read("org/local-a", "README.md").decode()
    assert "base_model" not in card_yaml(card) and "license: apache-2.0" in card_yaml(card)
    assert "vllm serve org/local-a" in card and "/fsx" not in card and str(local_named) not in card
    p = run_qstream("convert", local_named, tmp_path / "b", "--mlp", "nvfp4", "--push-to-hub", "org/local-b",
                    "--base-model", "org/tiny", env=env)
    assert p.returncode == 0, p.stderr
    assert "base_model: org/tiny" in card_yaml(hub.state.read("org/local-b", "README.md").decode())


def test_bad_card_metadata_fails_before_the_first_upload(hub, local_named, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(local_named, src)
    (src / "README.md").write_text("---\nlicense: apache 2\n---\n# x\n")
    before = len(hub.state.stats.requests)
    p = run_qstream("convert", src, tmp_path / "out", "--mlp", "nvfp4", "--push-to-hub", "org/bad-card",
                    env=hub_env(hub, tmp_path / "home"))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    msg = " ".join(p.stderr.split())
    assert "the Hub rejects the model card's metadata" in msg and '"license" with value "apache 2"' in msg, msg
    assert "nothing was uploaded" in msg
    later = hub.state.stats.requests[before:]
    assert not [r for r in later if "preupload" in r[1] or "/objects/" in r[1] or "/commit/" in r[1]], later
    assert not (tmp_path / "out" / "config.json").exists()


def test_failed_commit_resumes_without_reuploading(hub, local_named, tmp_path):
    env = hub_env(hub, tmp_path / "home")
    cmd = ("convert", local_named, tmp_path / "out", "--mlp", "nvfp4", "--push-to-hub", "org/commit-retry")
    hub.state.fail_commits = 1
    p = run_qstream(*cmd, env=env)
    assert p.returncode == 2 and "committing" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not hub.state.tree("org/commit-retry").get("config.json")
    puts = len(hub.state.stats.puts)
    p = run_qstream(*cmd, env=env)
    assert p.returncode == 0, p.stderr
    assert len(hub.state.stats.puts) == puts  # every shard was already on the Hub: nothing sent again
    assert "already done (checksum verified), kept" in p.stdout
    files = hub.state.tree("org/commit-retry")
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
