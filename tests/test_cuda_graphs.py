"""CUDA graphs: the padded static layout (any machine) and graph replay against kernel-by-kernel
launches of the same model (GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagserve import LLM, PoolingParams
from tagserve.engine.cuda_graphs import CapturedForward, CudaGraphs, captured_sizes
from tagserve.layers.attention_kernel import QUERY_BLOCK

from checkpoints import sentences
from gpu import needs_cuda

RAW = PoolingParams(use_activation=False)


def layout_only(num_tokens: int, num_seqs: int, max_seqlen: int) -> CapturedForward:
    return CapturedForward(num_tokens, num_seqs, max_seqlen, None, None, None)


def test_padding_becomes_sequences_no_longer_than_max_seqlen():
    graph = layout_only(num_tokens=64, num_seqs=10, max_seqlen=16)
    lens = np.array([5, 7])
    ids = np.arange(12, dtype=np.int64) + 100
    positions = np.concatenate([np.arange(5), np.arange(7)])
    flat = np.concatenate(graph.host_inputs(ids, positions, np.cumsum(lens)))
    assert graph.num_work == 1 + 10  # 64 tokens in blocks of 64, plus one per sequence
    assert len(flat) == 2 * 64 + 10 + 1 + 2 * graph.num_work
    got_ids, got_pos, cu, work = flat[:64], flat[64:128], flat[128:139], flat[139:]
    assert got_ids[:12].tolist() == ids.tolist() and not got_ids[12:].any()
    assert got_pos[:12].tolist() == positions.tolist() and not got_pos[12:].any()
    # 52 padding tokens: pieces of 16, 16, 16, 4, then empty sequences ending at 64
    assert cu.tolist() == [0, 5, 12, 28, 44, 60, 64, 64, 64, 64, 64]
    assert np.diff(cu).max() <= 16
    # one attention block for each of the 6 non-empty sequences, then idle items
    seq, block = work.reshape(2, -1)
    assert seq[:6].tolist() == [0, 1, 2, 3, 4, 5] and not block[:6].any()
    assert (block[6:] * QUERY_BLOCK >= 64).all()


def test_fits_counts_the_padding_sequences():
    graph = layout_only(num_tokens=64, num_seqs=6, max_seqlen=16)
    assert graph.fits(12, 2)  # 52 padding tokens need 4 more sequences: 6 in all
    assert not graph.fits(12, 3)
    assert graph.fits(64, 6)
    assert not graph.fits(65, 1)


def test_graph_sizes_follow_the_token_budget():
    graphs = CudaGraphs(None, torch.device("cpu"), max_num_batched_tokens=100, max_num_seqs=8,
                        max_seqlen=32)
    assert graphs.shapes == [(16, 9), (32, 9), (64, 10), (100, 12)]
    assert captured_sizes(64) == [16, 32, 64]
    assert captured_sizes(10) == [10]
    # powers of two up to 16,384, then steps of 8,192 (at most a third padding), the budget last
    assert captured_sizes(65_536)[10:] == [16_384, 24_576, 32_768, 40_960, 49_152, 57_344,
                                           65_536]
    assert captured_sizes(30_000)[-3:] == [16_384, 24_576, 30_000]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["bert", "qwen3", "modernbert", "mistral"])
def test_graph_replay_matches_eager_launches(family, make_checkpoint):
    """Same model, same batches: replayed from graphs (padded) or launched kernel by kernel."""
    llm = LLM(str(make_checkpoint(family)), device="cuda", dtype="bfloat16")
    runner = llm.llm_engine.runner
    graphs = runner.graphs
    assert graphs is not None and graphs.graphs
    picked: list[int] = []
    pick = graphs.pick

    def recording_pick(num_tokens: int, num_seqs: int) -> CapturedForward | None:
        graph = pick(num_tokens, num_seqs)
        picked.append(0 if graph is None else graph.num_tokens)
        return graph

    graphs.pick = recording_pick
    cases = [sentences(1, seed=21), sentences(7, seed=22), sentences(64, seed=23)]
    replayed = [llm.encode(p, RAW, pooling_task="token_classify", use_tqdm=False)
                for p in cases]
    assert picked and all(picked), "every batch should have run from a graph"
    runner.graphs = None
    launched = [llm.encode(p, RAW, pooling_task="token_classify", use_tqdm=False)
                for p in cases]
    worst, agree, total = 0.0, 0, 0
    for outs_g, outs_e in zip(replayed, launched, strict=True):
        for g, e in zip(outs_g, outs_e, strict=True):
            a, b = g.outputs.data, e.outputs.data
            assert a.shape == b.shape
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(b)
    print(f"{family}: graphs {sorted(set(picked))}, rel diff {worst:.2e}, "
          f"argmax agreement {agree / total:.4f}")
    assert worst < 2e-2
    assert agree / total >= 0.995


@pytest.mark.gpu
@needs_cuda
def test_large_batches_replay_graphs_of_their_size(make_checkpoint):
    """A budget above 16,384 tokens: full batches replay the graphs captured in 8,192-token
    steps, and give what kernel-by-kernel launches give."""
    llm = LLM(str(make_checkpoint("bert")), device="cuda", dtype="bfloat16",
              max_num_batched_tokens=40_000, max_num_seqs=2048)
    runner = llm.llm_engine.runner
    assert [g.num_tokens for g in runner.graphs.graphs][-3:] == [24_576, 32_768, 40_000]
    picked: list[int] = []
    pick = runner.graphs.pick

    def recording_pick(num_tokens: int, num_seqs: int) -> CapturedForward | None:
        graph = pick(num_tokens, num_seqs)
        picked.append(0 if graph is None else graph.num_tokens)
        return graph

    runner.graphs.pick = recording_pick
    prompts = sentences(3000, seed=24)
    replayed = llm.encode(prompts, RAW, pooling_task="token_classify", use_tqdm=False)
    assert 40_000 in picked and all(picked)
    runner.graphs = None
    launched = llm.encode(prompts, RAW, pooling_task="token_classify", use_tqdm=False)
    worst = max(float((g.outputs.data - e.outputs.data).abs().max() / e.outputs.data.abs().max())
                for g, e in zip(replayed, launched, strict=True))
    assert worst < 2e-2
