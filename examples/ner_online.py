"""Named-entity recognition over HTTP: what vLLM's `ner_online.py` client does, against tagserve.

Start a server, then run the client with the same model name:

    tagserve serve boltuix/NeuroBERT-NER
    python examples/ner_online.py --model boltuix/NeuroBERT-NER

The request is vLLM's exactly (`{"model", "input": text}`, no task): the server's default task
for a `*ForTokenClassification` checkpoint is token_classify, and it returns one row of label
probabilities per token, special tokens included.
"""

from __future__ import annotations

import argparse

import httpx
import torch
from transformers import AutoConfig, AutoTokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="boltuix/NeuroBERT-NER")
    parser.add_argument("--text", default="Barack Obama visited Microsoft headquarters in "
                                          "Seattle on January 2025.")
    return parser.parse_args()


def post_http_request(prompt: dict, api_url: str) -> httpx.Response:
    headers = {"User-Agent": "Test Client"}
    return httpx.post(api_url, headers=headers, json=prompt, timeout=60)


def main(args: argparse.Namespace) -> None:
    api_url = f"http://{args.host}:{args.port}/pooling"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    label_map = AutoConfig.from_pretrained(args.model).id2label

    response = post_http_request({"model": args.model, "input": args.text}, api_url)
    response.raise_for_status()
    output = response.json()["data"][0]
    logits = torch.tensor(output["data"])  # [num_tokens, num_labels] probabilities
    predictions = logits.argmax(dim=-1)

    tokens = tokenizer.convert_ids_to_tokens(tokenizer(args.text)["input_ids"])
    assert len(tokens) == len(predictions), (len(tokens), len(predictions))
    for token, label_id in zip(tokens, predictions, strict=True):
        if token not in tokenizer.all_special_tokens:
            print(f"{token:15} -> {label_map[int(label_id)]}")


if __name__ == "__main__":
    main(parse_args())
