"""Shard URLs: brace expansion, several sources, a seeded per-epoch order, node and worker split."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional

import fsspec
import webdataset as wds
from webdataset.gopen import gopen_schemes

from mmcl.errors import ConfigError, DataError

# URL schemes webdataset does not open itself, opened through fsspec (its s3fs, gcsfs, adlfs plugins,
# which the user installs for the storage they use; `memory://` is fsspec's own). webdataset keeps its
# own `pipe:`, http(s), `gs://` (gsutil) and `hf://`.
FSSPEC_SCHEMES = ("s3", "gcs", "az", "abfs", "abfss", "oci", "memory")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: object) -> object:
    return fsspec.open(url, mode).open()


for _scheme in FSSPEC_SCHEMES:
    gopen_schemes.setdefault(_scheme, _fsspec_open)


def expand_urls(urls: str) -> List[str]:
    """'a/{000..009}.tar::b/x.tar' -> every shard, sources in the order given."""
    expanded = wds.shardlists.expand_urls(urls)
    if not expanded:
        raise DataError(f"no shards in {urls!r}")
    return expanded


def source_of_shards(urls: str) -> Dict[str, int]:
    """Each shard URL -> the index of its source (the "::"-separated parts of `urls`, in order)."""
    return {shard: i for i, part in enumerate(urls.split("::")) if part for shard in expand_urls(part)}


def check_local_shards(urls: str, key: str) -> None:
    """A ConfigError naming `key` when a local shard the URLs name is not a file (URLs with a scheme or
    a `pipe:` command are left to the stream, which skips and counts what it cannot read)."""
    try:
        expanded = expand_urls(urls)
    except (DataError, ValueError) as error:
        raise ConfigError(f"config key {key!r}: {urls!r} names no shards ({error})") from None
    local = [url.removeprefix("file:") for url in expanded if "://" not in url and not url.startswith("pipe:")]
    missing = [url for url in local if not Path(url).is_file()]
    if missing:
        raise ConfigError(
            f"config key {key!r}: {len(missing)} of the {len(expanded)} shards it names do not "
            f"exist, first {missing[0]}"
        )


def shard_order(urls: List[str], seed: int, epoch: int) -> List[str]:
    """Every shard once, in an order fixed by (seed, epoch).

    The order must be identical on every rank and worker, because split_by_node/split_by_worker
    then take interleaved slices of it: a different order per process would repeat or drop shards.
    """
    order = list(urls)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def read_sizes(urls: List[str]) -> Optional[int]:
    """Total samples from the sizes.json beside local shards, or None when any shard is not listed."""
    total = 0
    cache: Dict[Path, Dict[str, int]] = {}
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file not in cache:
            if not sizes_file.exists():
                return None
            cache[sizes_file] = json.loads(sizes_file.read_text())
        if path.name not in cache[sizes_file]:
            return None
        total += cache[sizes_file][path.name]
    return total
