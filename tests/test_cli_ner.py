"""`tagserve ner`: one text as a table, a JSONL corpus with resume and throughput, and MODEL
defaulting to the bundled model (for `tagserve serve` too)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import tagserve.bundled
from tagserve import LLM
from tagserve.cli import build_parser, engine_args, main, server_settings
from tagserve.postprocess.ner import jsonable

from json_close import assert_json_close

TEXT = "Alice moved to Paris in 1999 and met Bob in Zürich."
TEXTS = ["Alice moved to Paris.", "Bob met Zoë in Zürich.", "Paris", "Did Bob pay €20?",
         "Zoë"]


@pytest.fixture(scope="module")
def ckpt(make_checkpoint) -> str:
    return str(make_checkpoint("bert"))


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt)


def table_rows(out: str) -> list[tuple[str, str, str, str]]:
    """(label, score, span, text) per line; checks that the columns line up."""
    lines = out.splitlines()
    starts = {tuple(m.start() for m in re.finditer(r"\S+", line))[2] for line in lines}
    assert len(starts) == 1, out  # the span column starts at one offset
    return [tuple(line.split(None, 3)) for line in lines]


@pytest.mark.parametrize("options", [
    {}, {"aggregation_strategy": "none", "threshold": 0.3, "labels": ["PER"]},
    {"aggregation_strategy": "first", "stride": 4},
])
def test_one_text_prints_an_entity_table(ckpt, llm, capsys, options):
    flags = []
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list)
                                                      else [value])]
    assert main(["ner", ckpt, TEXT, *flags]) == 0
    rows = table_rows(capsys.readouterr().out)
    expected = llm.ner(TEXT, use_tqdm=False, **options)
    assert rows[0] == ("label", "score", "span", "text") and len(rows) == len(expected) + 1
    for (label, score, span, text), e in zip(rows[1:], expected, strict=True):
        assert label == e.get("entity_group", e.get("entity"))
        assert (span, text) == (f"{e['start']}-{e['end']}", TEXT[e["start"]:e["end"]])
        assert float(score) == pytest.approx(float(e["score"]), abs=5e-4)


def write_jsonl(path: Path, records: list[dict[str, Any]], mode: str = "w") -> None:
    with path.open(mode, encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def test_corpus_job_writes_one_line_per_input_and_resumes(ckpt, llm, tmp_path, capsys):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": "a", "text": TEXTS[0]}, {"text": TEXTS[1]}])
    write_jsonl(source, [{"id": 7, "text": TEXTS[2]}], "a")
    source.write_text(source.read_text().replace("\n", "\n\n", 1))  # a blank line: counted
    argv = ["ner", ckpt, "--input", str(source), "--output", str(output), "--batch-size", "2"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    tokens = sum(len(llm.get_tokenizer().encode(t)) for t in TEXTS[:3])
    assert re.fullmatch(rf"Tagged 3 texts \({tokens} tokens\) in [\d.]+ s: [\d.]+ texts/s, "
                        r"\d+ tokens/s; skipped 0 already done\n", captured.out)
    assert "Tagging" in captured.err  # the progress bar
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 3, 7]  # the line number
    assert_json_close([r["entities"] for r in rows], jsonable(llm.ner(TEXTS[:3], use_tqdm=False)))

    # Resume: a crash left half a line; new inputs (and a repeated id) come in.
    done = output.read_text()
    output.write_text(done + '{"id": "b", "enti')
    write_jsonl(source, [{"id": "b", "text": TEXTS[3]}, {"id": "a", "text": "again"},
                         {"id": "c", "text": TEXTS[4]}], "a")
    assert main(argv) == 0
    assert re.match(r"Tagged 2 texts .* skipped 4 already done", capsys.readouterr().out)
    text = output.read_text()
    assert text.startswith(done)
    rows = [json.loads(line) for line in text[len(done):].splitlines()]
    assert [r["id"] for r in rows] == ["b", "c"]
    assert_json_close([r["entities"] for r in rows], jsonable(llm.ner(TEXTS[3:], use_tqdm=False)))

    assert main(argv) == 0  # nothing left to do
    assert capsys.readouterr().out.startswith("Tagged 0 texts (0 tokens)")


def test_corpus_errors_are_reported_before_any_work(ckpt, tmp_path, caplog):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(source, [{"id": 1, "text": "Paris"}, {"id": 2, "body": "Paris"}])
    assert main(["ner", ckpt, "--input", str(source), "--output", str(output)]) == 1
    assert f"{source}:2: expected" in caplog.text and not output.exists()
    source.write_text("{not json\n")
    assert main(["ner", ckpt, "--input", str(source), "--output", str(output)]) == 1
    assert f"{source}:1: not JSON" in caplog.text


@pytest.mark.parametrize("argv", [["ner"], ["ner", "m", "text", "--input", "in.jsonl"],
                                  ["ner", "--input", "in.jsonl"], ["ner", "--output", "o.jsonl"]])
def test_usage_errors(argv, capsys):
    assert main(argv) == 2
    assert "give either TEXT, or --input IN.jsonl and --output OUT.jsonl" in \
        capsys.readouterr().err


def test_model_defaults_to_the_bundled_one(ckpt, llm, monkeypatch, tmp_path, capsys, caplog):
    monkeypatch.setattr(tagserve.bundled, "DEFAULT_MODEL", Path(ckpt))
    assert main(["ner", TEXT]) == 0  # one positional argument: the text
    assert len(table_rows(capsys.readouterr().out)) == len(llm.ner(TEXT, use_tqdm=False)) + 1
    args = build_parser().parse_args(["serve"])
    assert engine_args(args).model == ckpt
    assert server_settings(args).served_model_names == [Path(ckpt).name]

    monkeypatch.setattr(tagserve.bundled, "DEFAULT_MODEL", tmp_path / "missing")
    assert main(["ner", TEXT]) == 1
    assert main(["serve"]) == 1
    assert caplog.text.count("No MODEL given and the bundled model is not installed") == 2
