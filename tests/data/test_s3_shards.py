"""The ``shard`` stage writing to, and the loader streaming from, ``s3://`` on the session's moto server.

The same fixture dataset is sharded locally and into the bucket: the objects must be the local shards byte for
byte, and the loaders must split them over 2 ranks x 2 workers exactly as they split the local ones.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import yaml

from birefnet.data.loader import SampleDecodeError, eval_loader_from_params, make_eval_loader, make_train_loader
from birefnet.data.shards import SplitIndex, iter_tar_members, open_for_read
from birefnet.stages.shard import main

try:
    from tests.data.wds_fixtures import tree_bytes, write_params, write_prepared
except ImportError:  # tests/ is not a package: pytest put this folder on sys.path
    from wds_fixtures import tree_bytes, write_params, write_prepared

COUNTS = {"DIS-TR": 11, "DIS-VD": 3, "DIS-TE1": 5}
SIZE = (64, 64)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, s3_server) -> tuple[Path, str, Path]:  # noqa: ANN001
    """(local shard folder, s3 URL of the same shards, params.yaml of the s3 run)."""
    root = tmp_path_factory.mktemp("s3shards")
    paths = write_prepared(root, COUNTS)
    local = root / "shards"
    assert main(["--params", str(write_params(root, paths, local, shard={"max_samples": 4})), "--quiet"]) == 0
    url = s3_server.make_bucket("shard-stage") + "/datasets/dis5k/shards"
    doc = yaml.safe_load(write_params(root, paths, root / "s3", shard={"max_samples": 4}).read_text())
    doc["shard"]["out"] = url
    params = root / "params-s3.yaml"
    params.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    assert main(["--params", str(params), "--quiet"]) == 0
    assert not (root / "s3").exists() and not Path("s3:").exists()
    return local, url, params


def test_shard_stage_writes_the_same_objects_to_s3(sharded: tuple[Path, str, Path], s3_server) -> None:  # noqa: ANN001
    local, url, _ = sharded
    files = tree_bytes(local)
    keys = s3_server.list_keys("shard-stage", "datasets/dis5k/shards/")
    assert [k.removeprefix("datasets/dis5k/shards/") for k in keys] == sorted(files)  # no temporary objects left
    fs = s3_server.filesystem()
    for name, data in files.items():
        assert fs.cat_file(f"{url.removeprefix('s3://')}/{name}") == data, name
    index = SplitIndex.read(f"{url}/train")
    assert index.samples == COUNTS["DIS-TR"] and len(index.sets["DIS-TR"]["shards"]) == 3
    members = [name for name, _ in iter_tar_members(f"{url}/train/DIS-TR-000000.tar")]
    assert members[:5] == [f"DIS-TR-000000.{ext}" for ext in ("gradient.png", "image.jpg", "json", "mask.png")] + \
        ["DIS-TR-000001.gradient.png"]


def test_reshard_to_s3_removes_stale_shards(sharded: tuple[Path, str, Path], s3_server) -> None:  # noqa: ANN001
    _, url, params = sharded
    bucket_prefix = url.removeprefix("s3://").split("/", 1)[1]
    fs = s3_server.filesystem()
    fs.pipe_file(f"{url.removeprefix('s3://')}/train/DIS-TR-000099.tar", b"stale")
    assert main(["--params", str(params), "--quiet"]) == 0
    keys = s3_server.list_keys("shard-stage", bucket_prefix + "/train/")
    assert not any(k.endswith("DIS-TR-000099.tar") for k in keys) and any(k.endswith("index.json") for k in keys)


def _keys_by_rank(location: str | Path, **kwargs: object) -> list[list[list[str]]]:
    """Per rank, the sample keys of every batch of one training epoch (2 ranks x 2 workers)."""
    out = []
    for rank in (0, 1):
        loader = make_train_loader(location, size=SIZE, batch_size=2, workers=2, shuffle_buffer=4, seed=3,
                                   rank=rank, world_size=2, **kwargs)
        out.append([batch["sample_key"] for batch in loader])
    return out


def test_train_loader_streams_s3_split_exactly_like_local(sharded: tuple[Path, str, Path]) -> None:
    local, url, _ = sharded
    from_s3 = _keys_by_rank(f"{url}/train", epoch_batches=6)
    assert from_s3 == _keys_by_rank(local / "train", epoch_batches=6)
    assert all(len(batches) == 6 for batches in from_s3)  # equal step counts on every rank
    # one pass (default epoch length) over 2 ranks x 2 workers reads every sample at most once
    one_pass = _keys_by_rank(f"{url}/train")
    seen = collections.Counter(key for rank in one_pass for batch in rank for key in batch)
    assert one_pass == _keys_by_rank(local / "train") and max(seen.values()) == 1


def test_eval_loader_reads_every_s3_sample_once(sharded: tuple[Path, str, Path]) -> None:
    local, url, params_path = sharded
    from birefnet.config import load_params

    params = load_params(params_path)
    seen = []
    for rank in (0, 1):
        loader = eval_loader_from_params(params, "DIS-TE1", rank=rank, world_size=2, workers=2)
        local_loader = make_eval_loader(local / "test", "DIS-TE1", size=SIZE, batch_size=params.loader.batch_size,
                                        workers=2, rank=rank, world_size=2)
        batches = list(loader)
        assert [b["sample_key"] for b in batches] == [b["sample_key"] for b in local_loader]
        assert all(shard.startswith(f"{url}/test/") for b in batches for shard in b["shard"])
        assert all(len(b["mask_original"]) == b["size"] for b in batches)
        seen += [k for b in batches for k in b["sample_key"]]
    assert sorted(seen) == [f"DIS-TE1-{i:06d}" for i in range(COUNTS["DIS-TE1"])]


def test_remote_shards_stream_without_a_local_copy(sharded: tuple[Path, str, Path]) -> None:
    _, url, _ = sharded
    with open_for_read(f"{url}/train/DIS-TR-000000.tar") as fh:
        assert type(fh).__module__.startswith("s3fs") and fh.read(5) is not None


def test_s3_shard_with_other_bytes_than_the_index_fails(sharded: tuple[Path, str, Path], s3_server) -> None:  # noqa: ANN001
    """A whole-shard read is hashed against the index: a shard replaced behind the index's back is named."""
    _, url, _ = sharded
    bucket_path = url.removeprefix("s3://")
    fs = s3_server.filesystem()
    copy = f"{bucket_path}/tampered"
    for name in ("index.json", "DIS-TE1-000000.tar", "DIS-TE1-000001.tar"):
        fs.copy(f"{bucket_path}/test/{name}", f"{copy}/{name}")
    index = json.loads(fs.cat_file(f"{copy}/index.json"))
    first, second = index["sets"]["DIS-TE1"]["shards"]
    first["sha256"], second["sha256"] = second["sha256"], first["sha256"]
    fs.pipe_file(f"{copy}/index.json", json.dumps(index).encode())
    loader = make_eval_loader(f"s3://{copy}", "DIS-TE1", size=SIZE, batch_size=2, workers=0)
    with pytest.raises(SampleDecodeError, match=r"DIS-TE1-00000[01]\.tar: sha256 .* the index says"):
        list(loader)
