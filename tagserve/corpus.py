"""`tag_corpus`: entities of every text of a JSONL file, appended to another JSONL file.

Input lines are `{"id": ..., "text": ...}` (`id` defaults to the line number, from 1); each
output line is `{"id": ..., "entities": [...]}`. A job resumes: ids already in the output are
skipped, and a last line cut short by a crash is removed first. Batches of texts go through
the engine with the next batch already queued, so the model never waits on post-processing;
with a `NerPool`, tokenization and post-processing (entities and their JSON) run in its
processes and this one only runs the model and writes the bytes they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.counting import CountingEngine
from tagserve.errors import ValidationError
from tagserve.postprocess.ner import (
    NerOptions,
    NerResult,
    Recognizer,
    documents_async,
    jsonable,
)
from tagserve.postprocess.ner_pool import NerPool

# Batches submitted to the engine ahead of the one being written.
IN_FLIGHT = 2


@dataclass(frozen=True)
class CorpusStats:
    texts: int
    tokens: int  # tokens run through the model, all windows counted
    seconds: float
    skipped: int  # records already in the output (or repeated ids)

    def summary(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (f"Tagged {self.texts} texts ({self.tokens} tokens) in {self.seconds:.2f} s: "
                f"{self.texts / seconds:.1f} texts/s, {self.tokens / seconds:.0f} tokens/s; "
                f"skipped {self.skipped} already done")


def json_lines(ids: Sequence[Any], results: list[NerResult]) -> bytes:
    """One `{"id": ..., "entities": [...]}` line per record, UTF-8."""
    return "".join(json.dumps({"id": i, "entities": r}, ensure_ascii=False) + "\n"
                   for i, r in zip(ids, jsonable(results), strict=True)).encode("utf-8")


def _key(record_id: Any) -> str:
    return json.dumps(record_id, sort_keys=True)


def done_ids(output: Path) -> set[str]:
    """Keys of the ids already in `output`, after cutting an unfinished last line."""
    if not output.exists():
        return set()
    keys: set[str] = set()
    with output.open("rb+") as f:
        size = 0
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            size += len(line)
            if line.strip():
                try:
                    keys.add(_key(json.loads(line)["id"]))
                except (json.JSONDecodeError, TypeError, KeyError) as exc:
                    raise ValidationError(f"{output}:{number}: not a result line") from exc
        f.truncate(size)
    return keys


def read_records(source: Path, skip: set[str]) -> Iterator[tuple[Any, str]]:
    """`(id, text)` of each record whose id is neither in `skip` nor seen before."""
    seen = set(skip)
    with source.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValidationError(f"{source}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValidationError(f'{source}:{number}: expected {{"id": ..., "text": '
                                      '"..."}')
            record_id = record.get("id", number)
            key = _key(record_id)
            if key not in seen:
                seen.add(key)
                yield record_id, record["text"]


async def tag_corpus(engine: AsyncEngine, options: NerOptions, source: Path, output: Path,
                     batch_size: int, pool: NerPool | None = None) -> CorpusStats:
    """Tag the records of `source` not yet in `output`, `batch_size` texts per engine call;
    every input line is checked before the first text runs. Post-processing runs in `pool`'s
    worker processes, or without one in the engine's thread pool."""
    done = done_ids(output)
    total = sum(1 for _ in read_records(source, done))
    with source.open(encoding="utf-8") as f:
        skipped = sum(1 for line in f if line.strip()) - total
    counter = CountingEngine(engine)
    recognizer = Recognizer.for_model(engine.model_config, engine.tokenizer, options)

    async def tag(ids: list[Any], texts: list[str]) -> bytes:
        docs = await documents_async(counter, recognizer, texts, None if pool is None
                                     else functools.partial(pool.prepare, recognizer))
        if pool is None:
            return await engine.run_in_pool(
                lambda: json_lines(ids, recognizer.finish(docs)))
        return await pool.lines(recognizer.options, docs, ids)

    pending: deque[tuple[int, asyncio.Future[bytes]]] = deque()
    start = time.perf_counter()
    with output.open("ab") as out, \
            tqdm(total=total, unit="text", desc="Tagging") as bar, \
            contextlib.closing(read_records(source, done)) as records:

        async def write_oldest() -> None:
            count, lines = pending.popleft()
            out.write(await lines)
            out.flush()
            bar.update(count)

        try:
            while batch := list(itertools.islice(records, batch_size)):
                ids, texts = zip(*batch, strict=True)
                pending.append((len(ids), asyncio.ensure_future(tag(list(ids), list(texts)))))
                if len(pending) > IN_FLIGHT:
                    await write_oldest()
            while pending:
                await write_oldest()
        finally:
            for _, lines in pending:
                lines.cancel()
            if pool is not None:
                pool.finished()
    return CorpusStats(total, counter.prompt_tokens, time.perf_counter() - start, skipped)
