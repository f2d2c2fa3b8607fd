"""The Hugging Face hub code path, without the network.

The hub is stubbed at the HTTP layer: huggingface_hub's client is swapped for one
whose transport is :class:`StubHub`, which serves ``resolve`` URLs (with ranges,
and an LFS-style redirect to a CDN for shards) and the tree API from local
folders and records every request. The local cache is a real cache layout
(``refs/``, ``snapshots/`` symlinked into ``blobs/``) built in a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import torch
from click.testing import CliRunner

huggingface_hub = pytest.importorskip("huggingface_hub")
if not hasattr(huggingface_hub, "set_client_factory"):
    pytest.skip("needs huggingface_hub with set_client_factory (>= 1.0)", allow_module_level=True)

from huggingface_hub import constants as hf_constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pacer_stream.cli import main  # noqa: E402
from pacer_stream.errors import PacerError  # noqa: E402
from pacer_stream.io import sources  # noqa: E402
from pacer_stream.io.reader import CheckpointIndex  # noqa: E402
from pacer_stream.io.sources import HubRepo, parse_ref  # noqa: E402

HUB = hf_constants.ENDPOINT  # https://huggingface.co unless HF_ENDPOINT says otherwise
CDN = "https://cdn-lfs.test"

# The tensors of scripts/make_fixtures.py's tiny llama, sharded the same way.
H, I, KV, V = 64, 128, 32, 256
SHARDS = {
    "model-00001-of-00003.safetensors": {
        "model.embed_tokens.weight": (V, H),
        **{f"model.layers.0.{k}": s for k, s in [
            ("mlp.gate_proj.weight", (I, H)), ("mlp.up_proj.weight", (I, H)),
            ("self_attn.q_proj.weight", (H, H)), ("self_attn.k_proj.weight", (KV, H)),
            ("self_attn.v_proj.weight", (KV, H)), ("self_attn.o_proj.weight", (H, H))]},
    },
    "model-00002-of-00003.safetensors": {
        "model.layers.0.input_layernorm.weight": (H,),
        "model.layers.0.post_attention_layernorm.weight": (H,),
        "model.layers.0.mlp.down_proj.weight": (H, I),
        **{f"model.layers.1.{k}": s for k, s in [
            ("input_layernorm.weight", (H,)), ("post_attention_layernorm.weight", (H,)),
            ("mlp.gate_proj.weight", (I, H)), ("mlp.up_proj.weight", (I, H)),
            ("mlp.down_proj.weight", (H, I)), ("self_attn.q_proj.weight", (H, H)),
            ("self_attn.k_proj.weight", (KV, H)), ("self_attn.v_proj.weight", (KV, H)),
            ("self_attn.o_proj.weight", (H, H))]},
        "model.norm.weight": (H,),
    },
    "model-00003-of-00003.safetensors": {"lm_head.weight": (V, H)},
}
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
    "intermediate_size": I, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": V, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
}


def write_tiny_llama(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for shard, shapes in SHARDS.items():
        tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=1))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Local folders: two tiny llamas, and a repo holding only a pickle checkpoint."""
    root = tmp_path_factory.mktemp("models")
    binonly = root / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text(json.dumps(CONFIG))
    # Not a pickle at all: if anything tried to unpickle it, it would fail loudly.
    (binonly / "pytorch_model.bin").write_bytes(b"not a pickle; must never be loaded")
    return {"tiny": write_tiny_llama(root / "tiny", 0),
            "tiny2": write_tiny_llama(root / "tiny2", 1), "binonly": binonly}


def make_cache(cache: Path, repo_id: str, folder: Path, revision: str = "main",
               skip: tuple[str, ...] = ()) -> Path:
    """Put ``folder`` into a hub cache laid out as huggingface_hub writes it."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no trailing newline, like huggingface_hub
    snapshot, blobs = repo_dir / "snapshots" / commit, repo_dir / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.name in skip:
            continue
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


class StubHub:
    """An httpx transport handler standing in for huggingface.co (and its CDN)."""

    def __init__(self, httpx) -> None:
        self.httpx = httpx
        self.repos: dict[tuple[str, str], Path] = {}  # (repo_id, revision) -> folder
        self.requests: list = []
        self.fail = None  # a reason: the test must make no request at all
        self.refused: set[str] = set()  # gated repos: listed, but files answer 401
        self.unreachable = False  # every request fails as if the network were down

    def add(self, repo_id: str, folder: Path, revision: str = "main") -> None:
        self.repos[(repo_id, revision)] = folder

    def __call__(self, request):
        self.requests.append(request)
        if self.fail:  # surfaces as an error; the test also checks `requests` afterwards
            raise AssertionError(f"{self.fail}: {request.method} {request.url}")
        if self.unreachable:
            raise self.httpx.ConnectError("no route to host", request=request)
        parts = [unquote(p) for p in request.url.raw_path.decode().split("?")[0].split("/")[1:]]
        origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
        if origin == HUB and parts[:2] == ["api", "models"] and len(parts) > 5 and parts[4] == "tree":
            folder = self.repos.get((f"{parts[2]}/{parts[3]}", parts[5]))
            if folder is None:
                return self.httpx.Response(404, headers={"X-Error-Code": "RepoNotFound"})
            tree = [{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40}
                    for p in sorted(folder.iterdir())]
            return self.httpx.Response(200, json=tree)
        if origin in (HUB, CDN) and len(parts) >= 5 and parts[2] == "resolve":
            if f"{parts[0]}/{parts[1]}" in self.refused:
                return self.httpx.Response(401, headers={"X-Error-Code": "GatedRepo"})
            folder = self.repos.get((f"{parts[0]}/{parts[1]}", parts[3]))
            file = folder / "/".join(parts[4:]) if folder is not None else None
            if file is None or not file.is_file():
                return self.httpx.Response(404, headers={"X-Error-Code": "EntryNotFound"})
            if origin == HUB and file.suffix == ".safetensors":  # LFS files live on the CDN
                location = CDN + request.url.raw_path.decode()
                return self.httpx.Response(302, headers={"Location": location})
            return self._serve(file.read_bytes(), request.headers.get("range"))
        return self.httpx.Response(404)

    def _serve(self, data: bytes, range_header: str | None):
        if range_header is None:
            return self.httpx.Response(200, content=data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header)
        assert match, f"unexpected Range header {range_header!r}"
        first = int(match[1])
        last = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        if first >= len(data):
            return self.httpx.Response(416, headers={"Content-Range": f"bytes */{len(data)}"})
        return self.httpx.Response(206, content=data[first:last + 1],
                                   headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})

    def file_requests(self, suffix: str) -> list:
        return [r for r in self.requests if r.url.path.endswith(suffix)]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stubbed hub, online mode, and an empty cache; the real client is restored after."""
    from huggingface_hub.utils import _http

    httpx = sys.modules[type(huggingface_hub.get_session()).__module__.split(".")[0]]
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory
    stub = StubHub(httpx)
    huggingface_hub.set_client_factory(
        lambda: httpx.Client(transport=httpx.MockTransport(stub), follow_redirects=True))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    (tmp_path / "hf-cache").mkdir()
    yield stub
    huggingface_hub.set_client_factory(previous)
    huggingface_hub.close_session()


@pytest.fixture
def cache(hub, tmp_path) -> Path:
    return tmp_path / "hf-cache"


def offline(monkeypatch, hub: StubHub) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.fail = "HF_HUB_OFFLINE is set but the hub was called"


def header_end(path: Path) -> int:
    """Offset where a safetensors file's data region starts: 8 + header length."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def requested_range(request) -> tuple[int, int]:
    header = request.headers.get("range")
    assert header, f"{request.url} was fetched without a Range header (whole file)"
    first, last = re.fullmatch(r"bytes=(\d+)-(\d+)", header).groups()
    return int(first), int(last)


@pytest.mark.parametrize("revision", [None, "v1.0", "refs/pr/1"])
def test_uncached_hub_model_reads_only_headers(hub, models, revision):
    hub.add("org/tiny", models["tiny"], revision or "main")
    ref = parse_ref("org/tiny" + (f"@{revision}" if revision else ""))
    assert (ref.repo_id, ref.revision) == ("org/tiny", revision)

    remote = CheckpointIndex.open(ref)
    local = CheckpointIndex.open(parse_ref(str(models["tiny"])))

    assert remote.tensors == local.tensors  # name, file, dtype, shape and byte range
    assert {n: (t.dtype, t.shape, t.nbytes) for n, t in remote.tensors.items()} == \
        {n: (t.dtype, t.shape, t.nbytes) for n, t in local.tensors.items()}
    assert remote.config == local.config
    assert hub.requests, "nothing was fetched from the (stub) hub"
    expected = f"/resolve/{quote(revision or 'main', safe='')}/"
    resolves = [r for r in hub.requests if "/resolve/" in r.url.raw_path.decode()]
    assert resolves and all(expected in r.url.raw_path.decode() for r in resolves)
    # The shards went through the CDN redirect with their Range intact, and no request
    # reached past a shard's header into its data: the weights were never downloaded.
    assert any(r.url.host == "cdn-lfs.test" for r in hub.requests)
    for shard in SHARDS:
        requests = hub.file_requests(shard)
        assert requests, f"{shard} was never read"
        for request in requests:
            first, last = requested_range(request)
            assert last < header_end(models["tiny"] / shard), \
                f"{request.url}: bytes {first}-{last} reach into the data region"

    # Reading one tensor fetches exactly its bytes, in one ranged request.
    name = "model.layers.1.self_attn.k_proj.weight"
    info = remote.tensors[name]
    before = len(hub.requests)
    assert torch.equal(remote.read(name), local.read(name))
    assert torch.equal(remote.read(name, rows=(3, 7)), local.read(name, rows=(3, 7)))
    ranges = [requested_range(r) for r in hub.requests[before:] if r.url.host == "cdn-lfs.test"]
    row = info.nbytes // info.shape[0]
    assert ranges == [(info.begin, info.end - 1), (info.begin + 3 * row, info.begin + 7 * row - 1)]


def test_unknown_hub_repo_is_a_one_line_error(hub):
    with pytest.raises(PacerError) as err:
        CheckpointIndex.open(parse_ref("org/missing"))
    message = str(err.value)
    assert "org/missing" in message and "\n" not in message
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("is_offline", [True, False], ids=["offline", "online"])
def test_cached_hub_model_is_read_from_the_cache(hub, cache, models, monkeypatch, is_offline):
    make_cache(cache, "org/tiny", models["tiny"])
    if is_offline:
        offline(monkeypatch, hub)
    else:  # online, but every file is cached: the hub is still never asked
        hub.fail = "every file is cached but the hub was called"

    index = CheckpointIndex.open(parse_ref("org/tiny"))
    local = CheckpointIndex.open(parse_ref(str(models["tiny"])))

    assert index.tensors == local.tensors
    assert index.config == local.config
    for name in local.tensors:
        assert torch.equal(index.read(name), local.read(name)), name
    assert hub.requests == []


def test_unreachable_hub_is_reported_at_once(hub, models):
    # Not "no checkpoint found", and no listing either (huggingface_hub would retry
    # that with back-off for ~20 s before giving up).
    hub.add("org/tiny", models["tiny"])
    hub.unreachable = True
    with pytest.raises(PacerError, match=r"cannot reach the hub.*HF_HUB_OFFLINE"):
        CheckpointIndex.open(parse_ref("org/tiny"))
    assert not any("/tree/" in r.url.path for r in hub.requests)


def test_gated_hub_repo_is_not_mistaken_for_missing_files(hub, models):
    hub.add("org/gated", models["tiny"])
    hub.refused.add("org/gated")
    with pytest.raises(PacerError, match=r"org/gated.*HTTP 401.*gated.*HF_TOKEN"):
        CheckpointIndex.open(parse_ref("org/gated"))


def test_offline_and_not_cached_is_a_one_line_error(hub, cache, monkeypatch):
    offline(monkeypatch, hub)
    with pytest.raises(PacerError) as err:
        CheckpointIndex.open(parse_ref("org/tiny"))
    message = str(err.value)
    assert "\n" not in message
    assert "org/tiny" in message and "cache" in message and "HF_HUB_OFFLINE" in message
    assert hub.requests == []


def test_offline_with_a_shard_missing_from_the_cache(hub, cache, models, monkeypatch):
    make_cache(cache, "org/tiny", models["tiny"], skip=("model-00002-of-00003.safetensors",))
    offline(monkeypatch, hub)
    with pytest.raises(PacerError, match=r"missing file model-00002-of-00003\.safetensors.*"
                                         r"cache.*HF_HUB_OFFLINE"):
        CheckpointIndex.open(parse_ref("org/tiny"))
    assert hub.requests == []


def test_partly_cached_hub_model_reads_the_rest_remotely(hub, cache, models):
    make_cache(cache, "org/tiny", models["tiny"], skip=("model-00003-of-00003.safetensors",))
    hub.add("org/tiny", models["tiny"])
    index = CheckpointIndex.open(parse_ref("org/tiny"))
    assert index.tensors == CheckpointIndex.open(parse_ref(str(models["tiny"]))).tensors
    fetched = {Path(r.url.path).name for r in hub.requests}
    assert fetched == {"model-00003-of-00003.safetensors"}


def test_cached_reads_survive_short_preads(hub, cache, models, monkeypatch):
    # Linux moves at most 0x7ffff000 bytes per read/pread call, so any tensor over
    # ~2 GiB comes back in pieces; LocalFile must keep reading, not call it truncated.
    make_cache(cache, "org/tiny", models["tiny"])
    offline(monkeypatch, hub)
    index = CheckpointIndex.open(parse_ref("org/tiny"))
    name = "model.embed_tokens.weight"  # 64 KiB, so 66 pieces below
    expected = CheckpointIndex.open(parse_ref(str(models["tiny"]))).read(name)
    real_preadv = os.preadv  # tensor data is read straight into its buffer
    calls = []
    monkeypatch.setattr(sources.os, "preadv", lambda fd, buffers, offset: calls.append(1) or
                        real_preadv(fd, [buffers[0][:1000]], offset))
    assert torch.equal(index.read(name), expected)
    assert len(calls) == 66


def test_a_file_shortened_after_indexing_is_a_short_read(models, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(models["tiny"], folder)
    index = CheckpointIndex.open(parse_ref(str(folder)))
    info = max(index.tensors.values(), key=lambda i: i.end)
    shard = folder / info.file
    shard.write_bytes(shard.read_bytes()[:info.end - 10])
    with pytest.raises(PacerError, match="short read .* truncated"):
        index.read(info.name)


def write_plan(folder: Path, models_: list[str]) -> Path:
    plan = folder / "plan.yaml"
    plan.write_text("project_name: hub-test\nmodels:\n" + "".join(f"  - {m}\n" for m in models_)
                    + "output:\n  path: ./out\n")
    return plan


def run_plan(plan: Path):
    result = CliRunner().invoke(main, ["plan", str(plan), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("is_offline", [True, False], ids=["offline-cache", "online-ranged"])
def test_cli_plan_on_hub_models(hub, cache, models, tmp_path, monkeypatch, is_offline):
    if is_offline:
        make_cache(cache, "org/tiny", models["tiny"])
        make_cache(cache, "org/tiny2", models["tiny2"])
        offline(monkeypatch, hub)
    else:
        hub.add("org/tiny", models["tiny"])
        hub.add("org/tiny2", models["tiny2"])

    result = run_plan(write_plan(tmp_path, ["org/tiny", "org/tiny2"]))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["read_bytes"] > 0
    assert report["models"] == ["org/tiny", "org/tiny2"]

    # The same plan on the local folders: identical figures.
    (tmp_path / "local").mkdir()
    local = run_plan(write_plan(tmp_path / "local", [str(models["tiny"]), str(models["tiny2"])]))
    assert local.exit_code == 0, local.output
    expected = json.loads(local.stdout)
    for key in ("read_bytes", "input_bytes", "peak_ram_bytes", "architecture"):
        if key in expected:
            assert report[key] == expected[key], key

    if is_offline:
        assert hub.requests == []
    else:
        for request in hub.requests:
            if request.url.path.endswith(".safetensors"):
                folder = models["tiny2" if "/org/tiny2/" in request.url.path else "tiny"]
                shard = folder / Path(request.url.path).name
                assert requested_range(request)[1] < header_end(shard)


@pytest.mark.parametrize("is_offline", [True, False], ids=["offline-cache", "online"])
def test_pickle_only_hub_repo_asks_for_safetensors(hub, cache, models, tmp_path, monkeypatch,
                                                   is_offline):
    if is_offline:
        make_cache(cache, "org/binonly", models["binonly"])
        make_cache(cache, "org/tiny", models["tiny"])
        offline(monkeypatch, hub)
    else:
        hub.add("org/binonly", models["binonly"])
        hub.add("org/tiny", models["tiny"])

    result = run_plan(write_plan(tmp_path, ["org/binonly", "org/tiny"]))
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("pacer-stream: error: org/binonly") and "\n" not in message
    assert "convert" in message.lower() and "safetensors" in message
    assert not any(r.url.path.endswith(".bin") for r in hub.requests), "the pickle was fetched"
    if is_offline:
        assert hub.requests == []


def test_hub_repo_refuses_paths_outside_the_repo(hub):
    repo = HubRepo("org/tiny")
    for name in ("../secrets.json", "/etc/passwd"):
        with pytest.raises(PacerError, match="outside the model folder"):
            repo.open(name)
    assert hub.requests == []
