"""Embedding an evaluation split: every sample through the model's towers, shared among the processes
and put back in the order one process reads it.

Each process embeds every W-th shard from its rank on (a folder dataset: every W-th run of
`FOLDER_CHUNK` files), so no process reads what another does; all processes then gather the parts
and sort the samples by (shard, position in the shard), which is one process's reading order. The
metrics computed from the result are therefore those of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from mmcl import dist
from mmcl.data import Batch, InputSpec, batches_from_samples, build_eval_loader
from mmcl.models import MultiEncoder

FOLDER_CHUNK = 256  # files of a folder dataset read by one process in a row (a folder's "shard")


@dataclass
class Embedded:
    """A split's embeddings, samples in reading order. A modality may hold several rows per sample (a
    sample's captions): `counts` says how many, in sample order."""

    emb: Dict[str, torch.Tensor]  # modality -> (rows, D), float32 on the CPU
    counts: Dict[str, torch.Tensor]  # modality -> (N,) rows of each sample
    labels: Optional[torch.Tensor]  # (N,) class ids, when the split has them
    skipped: int  # unreadable samples, over all processes

    def __len__(self) -> int:
        return len(next(iter(self.counts.values())))

    def owner(self, modality: str) -> torch.Tensor:
        """(rows,): the sample each of the modality's rows belongs to."""
        counts = self.counts[modality]
        return torch.repeat_interleave(torch.arange(len(counts)), counts)


@dataclass
class _Part:
    """What one process embedded, with each sample's place in the reading order."""

    order: List[Tuple[int, int]]  # per sample: (shard index, position in the shard)
    emb: Dict[str, torch.Tensor]
    counts: Dict[str, torch.Tensor]
    labels: Optional[torch.Tensor]
    skipped: int


def _my_folder_samples(folder_samples: Callable[..., Iterator[dict]], rank: int, world: int) -> Iterator[dict]:
    """This process's runs of FOLDER_CHUNK files (only those are read), each sample tagged with its run
    as its "shard"."""
    for sample in folder_samples(lambda index: (index // FOLDER_CHUNK) % world == rank):
        yield {**sample, "__url__": f"{sample['__url__']}[{sample['__index__'] // FOLDER_CHUNK}]"}


def _embed_part(
    model: MultiEncoder,
    batches: Iterator[Batch],
    shard_index: Callable[[str], int],
    modalities: Sequence[str],
    labelled: bool,
    device: torch.device,
    towers: Mapping[str, str],
) -> _Part:
    emb: Dict[str, List[torch.Tensor]] = {m: [] for m in modalities}
    counts: Dict[str, List[torch.Tensor]] = {m: [] for m in modalities}
    labels: List[torch.Tensor] = []
    order: List[Tuple[int, int]] = []
    seen: Dict[int, int] = {}  # shard index -> samples read from it so far
    skipped = 0
    for batch in batches:
        skipped += batch.skipped
        if not len(batch):  # only the count of samples skipped after the last batch
            continue
        for m in modalities:
            emb[m].append(model.encode(towers.get(m, m), batch.inputs[m].to(device)).float().cpu())
            counts[m].append(batch.counts.get(m, torch.ones(len(batch), dtype=torch.long)))
        if labelled:
            labels.append(batch.inputs["label"])
        for key in batch.keys:  # "<shard url>#<sample key>"; a sample key may hold "#" itself
            shard = shard_index(key.split("#", 1)[0])
            order.append((shard, seen.get(shard, 0)))
            seen[shard] = seen.get(shard, 0) + 1
    width = model.embed_dim
    return _Part(
        order,
        {m: torch.cat(parts) if parts else torch.zeros(0, width) for m, parts in emb.items()},
        {m: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long) for m, parts in counts.items()},
        (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)) if labelled else None,
        skipped,
    )


def _merge(parts: Sequence[_Part], modalities: Sequence[str], labelled: bool) -> Embedded:
    """The parts' samples in reading order: sorted by (shard, position)."""
    order = [place for part in parts for place in part.order]
    ranking = sorted(range(len(order)), key=order.__getitem__)  # sample i of the merged set comes from ranking[i]
    emb, counts = {}, {}
    for m in modalities:
        rows = torch.cat([part.emb[m] for part in parts])  # (rows, D), in part order
        sample_counts = torch.cat([part.counts[m] for part in parts])  # (N,)
        starts = torch.cumsum(sample_counts, 0) - sample_counts  # (N,) first row of each sample
        take = [torch.arange(int(starts[i]), int(starts[i] + sample_counts[i])) for i in ranking]
        emb[m] = rows[torch.cat(take)] if take else rows  # (rows, D), in reading order
        counts[m] = sample_counts[ranking] if ranking else sample_counts
    labels = torch.cat([part.labels for part in parts if part.labels is not None])[ranking] if labelled else None
    return Embedded(emb, counts, labels, sum(part.skipped for part in parts))


def _gather(part: _Part, modalities: Sequence[str]) -> List[_Part]:
    """Every process's part, in rank order (all processes take part)."""
    if not dist.is_distributed():
        return [part]
    orders = dist.all_gather_object(part.order)
    skipped = dist.all_gather_object(part.skipped)
    emb = {m: dist.all_gather_rows(part.emb[m]) for m in modalities}
    counts = {m: dist.all_gather_rows(part.counts[m]) for m in modalities}
    labels = dist.all_gather_rows(part.labels) if part.labels is not None else None
    return [
        _Part(
            orders[r],
            {m: emb[m][r] for m in modalities},
            {m: counts[m][r] for m in modalities},
            labels[r] if labels is not None else None,
            skipped[r],
        )
        for r in range(dist.world_size())
    ]


@torch.no_grad()
def embed_split(
    model: MultiEncoder,
    shards: Sequence[str],
    folder_samples: Callable[..., Iterator[dict]],
    inputs: Mapping[str, InputSpec],
    batch_size: int,
    device: torch.device,
    desc: str = "eval",
    progress: bool = True,
    towers: Optional[Mapping[str, str]] = None,
) -> Embedded:
    """Collective when distributed: every process calls it with the same split. `inputs` holds the
    modalities to embed, and "label" to read class ids; `towers`: the tower embedding an input that is
    not named after its modality (e.g. a sample's wrong captions: the text tower)."""
    rank, world = dist.rank(), dist.world_size()
    modalities = [m for m in inputs if m != "label"]
    labelled = "label" in inputs
    model.eval()
    if shards:
        index = {url: i for i, url in enumerate(shards)}
        mine = list(shards[rank::world])  # none when there are more processes than shards
        batches: Iterator[Batch] = iter(build_eval_loader(mine, dict(inputs), batch_size)) if mine else iter(())
        shard_index: Callable[[str], int] = index.__getitem__
    else:
        samples = _my_folder_samples(folder_samples, rank, world)
        batches = batches_from_samples(samples, dict(inputs), batch_size)
        shard_index = lambda url: int(url.rsplit("[", 1)[1].rstrip("]"))  # noqa: E731
    batches = tqdm(batches, desc=desc, disable=not progress or rank != 0, leave=False)
    part = _embed_part(model, batches, shard_index, modalities, labelled, device, towers or {})
    return _merge(_gather(part, modalities), modalities, labelled)
