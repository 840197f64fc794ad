"""The transformers peer, set up to be fair: SDPA attention, `torch.inference_mode`, bf16 on GPU
(fp32 on CPU), length-sorted right-padded batches and the best of several batch sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

Batch = dict[str, torch.Tensor]


class HFPeer:
    """A checkpoint loaded by transformers, run the way a careful user would run it."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForTokenClassification.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------- model only

    def padded_batches(self, token_ids: Sequence[Sequence[int]], batch_size: int) -> list[Batch]:
        """Length-sorted, right-padded `input_ids`/`attention_mask` batches, already on the
        device (built before timing: the model-only measurement excludes them)."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        batches = [self._pad([token_ids[i] for i in order[start:start + batch_size]])
                   for start in range(0, len(order), batch_size)]
        self.sync()
        return batches

    def _pad(self, rows: Sequence[Sequence[int]]) -> Batch:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[j, :len(row)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    @torch.inference_mode()
    def run_model_only(self, batches: list[Batch]) -> None:
        """Forward and softmax per batch; results stay on the device (the peer's best case)."""
        for batch in batches:
            self.model(**batch).logits.float().softmax(-1)
        self.sync()

    # ------------------------------------------------------------------------- end to end

    @torch.inference_mode()
    def run_end_to_end(self, texts: Sequence[str], batch_size: int) -> list[torch.Tensor]:
        """Raw text to per-text CPU float32 probabilities, in input order: sort by characters,
        tokenize each batch with the fast tokenizer, forward, softmax, one copy back a batch."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in chunk], padding=True, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            probs = self.model(**enc).logits.float().softmax(-1).cpu()
            lengths = enc["attention_mask"].sum(1).tolist()
            for row, (i, n) in enumerate(zip(chunk, lengths, strict=True)):
                out[i] = probs[row, :n]
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[Sequence[int]], batch_size: int = 8) -> list[np.ndarray]:
        """Float32 logits per text (for the accuracy check), in input order."""
        out: list[np.ndarray] = []
        for start in range(0, len(token_ids), batch_size):
            rows = token_ids[start:start + batch_size]
            logits = self.model(**self._pad(rows)).logits.float().cpu()
            out.extend(logits[j, :len(r)].numpy() for j, r in enumerate(rows))
        return out


def search_batch_size(run: Callable[[int], float], sizes: Sequence[int],
                      log: Callable[[str], None] = print) -> dict[int, float]:
    """Seconds per batch size (`run(batch_size)` times one pass); sizes that run out of device
    memory are skipped."""
    seconds: dict[int, float] = {}
    for size in sizes:
        try:
            seconds[size] = run(size)
        except torch.cuda.OutOfMemoryError:
            log(f"  batch size {size}: out of memory, skipped")
            torch.cuda.empty_cache()
    if not seconds:
        raise RuntimeError("every batch size ran out of memory")
    return seconds
