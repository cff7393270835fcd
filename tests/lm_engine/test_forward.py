"""The hand-written Qwen3 forward on the static row cache equals transformers' forward, and the
CUDA-graph decode path is skipped cleanly where there is no CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from acestep.lm.engine.graphs import DecodeRunner, bucket_for, length_buckets, row_buckets
from acestep.lm.engine.model import FastQwen3


@pytest.fixture(scope="module")
def gqa_model():
    """Tiny fp32 Qwen3 with grouped KV heads (4 q / 2 kv), tied head."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         rope_theta=10000.0, rms_norm_eps=1e-6)
    return Qwen3ForCausalLM(config).eval()


def _reference(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("attention", ["sdpa", "gqa"])
@torch.no_grad()
def test_prefill_and_mixed_position_decode_match_transformers(gqa_model, attention):
    net = FastQwen3(gqa_model, max_rows=4, max_len=64, decode_attention=attention)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (9, 17, 5)]
    rows = (0, 2, 3)  # row 1 stays idle: a hole the decode step covers and ignores
    for seq, row in zip(seqs, rows):
        got = net.prefill(torch.tensor(seq[:-1]), row)
        assert torch.allclose(got, _reference(gqa_model, seq[:-1])[-1], atol=1e-5, rtol=0)
    tokens, positions = [0] * 4, [0] * 4
    for seq, row in zip(seqs, rows):
        tokens[row], positions[row] = seq[-1], len(seq) - 1
    out = net.decode(torch.tensor(tokens), torch.tensor(positions), kv_len=max(positions) + 1)
    for seq, row in zip(seqs, rows):
        assert torch.allclose(out[row], _reference(gqa_model, seq)[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "gqa"])
@torch.no_grad()
def test_batched_prefill_matches_transformers(gqa_model, attention):
    net = FastQwen3(gqa_model, max_rows=4, max_len=64, decode_attention=attention)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (6, 19, 11)]
    got = net.prefill_many([s[:-1] for s in seqs], [3, 0, 1])
    for row, seq in enumerate(seqs):
        assert torch.allclose(got[row], _reference(gqa_model, seq[:-1])[-1], atol=1e-5, rtol=0)
    tokens, positions = [seqs[1][-1], seqs[2][-1], 0, seqs[0][-1]], [18, 10, 0, 5]
    out = net.decode(torch.tensor(tokens), torch.tensor(positions), kv_len=19)  # padding writes never seen
    for row, seq in ((3, seqs[0]), (0, seqs[1]), (1, seqs[2])):
        assert torch.allclose(out[row], _reference(gqa_model, seq)[-1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_demo_lm_logits_match_transformers(lm_handler):
    model = lm_handler.llm.model
    net = FastQwen3(model, max_rows=2, max_len=128)
    ids = lm_handler.tokenize("<think>\nbpm: 120\ncaption: a calm piano piece")
    got = net.prefill(torch.tensor(ids), 1)
    assert torch.allclose(got, _reference(model, ids)[-1], atol=1e-5, rtol=0)
    nxt = int(got.argmax())
    step = net.decode(torch.tensor([0, nxt]), torch.tensor([0, len(ids)]), kv_len=len(ids) + 1)
    assert torch.allclose(step[1], _reference(model, ids + [nxt])[-1], atol=1e-5, rtol=0)


def test_buckets():
    assert row_buckets(64) == [2, 4, 8, 16, 32, 64] and row_buckets(12) == [2, 4, 8, 12]
    assert length_buckets(4096) == [256, 512, 1024, 2048, 4096] and length_buckets(300) == [256, 300]
    assert bucket_for(5, row_buckets(64)) == 8 and bucket_for(257, length_buckets(4096)) == 512
    with pytest.raises(ValueError):
        bucket_for(65, row_buckets(64))


@torch.no_grad()
def test_cuda_graphs_are_off_on_cpu(gqa_model):
    net = FastQwen3(gqa_model, max_rows=4, max_len=64)
    runner = DecodeRunner(net, use_graphs=True)
    assert not runner.use_graphs
    net.prefill(torch.tensor([5, 6, 7]), 0)
    logits = runner.run([8], [3])
    assert logits.shape == (1, 300) and not runner.graphs
    assert torch.allclose(logits[0], _reference(gqa_model, [5, 6, 7, 8])[-1], atol=1e-5, rtol=0)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_replay_equals_eager(gqa_model):
    model = gqa_model.to("cuda")
    try:
        net = FastQwen3(model, max_rows=8, max_len=512)
        eager, graphed = DecodeRunner(net, use_graphs=False), DecodeRunner(net, use_graphs=True)
        for row, n in enumerate((5, 9, 3)):
            net.prefill(torch.arange(1, n + 1, device="cuda"), row)
        want = eager.run([11, 12, 13], [5, 9, 3]).clone()
        got = graphed.run([11, 12, 13], [5, 9, 3])
        assert (4, 256) in graphed.graphs
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        again = graphed.run([11, 12, 13], [5, 9, 3])  # replay of the captured graph
        assert torch.allclose(again, want, atol=1e-4, rtol=1e-4)
    finally:
        gqa_model.to("cpu")
