"""Training batches: examples encoded by the model's tokenizer, with the teachers' stored KV beside them.

``collate_fn`` checks the examples once, up front (known tasks, each store holding exactly these examples
in this order, every text within the model's positions), and returns the ``collate(indices)`` a
``DataLoader`` calls. A batch is what ``kvlib.text.encode_batch`` gives (right-padded ids, mask, character
offsets, segment bounds) plus ``task_ids`` (indices into ``kvlib.data.TASKS``) and, with stores,
``teachers``: one ``KVStore.batch`` per teacher.
"""

from __future__ import annotations

import torch

from kvlib.data import SEGMENTS, TASKS, Example
from kvlib.text import check_lengths, encode_batch


def collate_fn(tokenizer, examples: list[Example], stores: list = (), max_length: int | None = None):
    """``collate(indices) -> batch``: the examples encoded by the student's tokenizer (right-padded, with
    offsets, segment bounds and ``task_ids`` indexing ``kvlib.data.TASKS``) and, under ``teachers``, each
    teacher's stored KV of the same examples. With ``max_length`` (the student's
    ``max_position_embeddings``) every example is checked once, up front: a text too long for the model is
    refused (``kvlib.text.check_lengths``), never truncated."""
    unknown = sorted({e.task for e in examples} - set(TASKS))
    if unknown:
        raise ValueError(f"training examples have tasks {unknown}; training takes the tasks {TASKS}")
    for i, store in enumerate(stores):
        if store.ids != [e.id for e in examples]:
            raise ValueError(
                f"KV store {i} holds {len(store)} examples that are not these {len(examples)} in this order; "
                "extract the store over the same split the student trains on"
            )
    if max_length is not None:
        check_lengths(tokenizer, [e.text for e in examples], [e.id for e in examples], max_length)

    def collate(indices) -> dict:
        chunk = [examples[i] for i in indices]
        spans = [{name: e.spans[name] for name in SEGMENTS} for e in chunk]
        batch = encode_batch(tokenizer, [e.text for e in chunk], spans, max_length)
        batch["task_ids"] = torch.tensor([TASKS.index(e.task) for e in chunk])
        if stores:
            batch["teachers"] = [store.batch(list(indices)) for store in stores]
        return batch

    return collate
