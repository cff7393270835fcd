"""Decode steps, eager or replayed from CUDA graphs captured per (row bucket, length bucket).

Inputs and outputs live in static buffers (token and position per row, fp32 logits per row);
a step covers rows ``0..B-1`` for the smallest row bucket ``B`` holding the running rows, and
attends over the smallest length bucket holding every row's position. On CPU (or with graphs
off) the step runs eagerly: GEMMs over a padded number of rows (``eager_rows``), attention per
row over exactly its own keys, so a row's logits never depend on its batch-mates."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from acestep.lm.engine.model import FastQwen3

ROW_BUCKETS = (2, 4, 8, 16, 32, 64)
MIN_LENGTH_BUCKET = 256
# CPU GEMMs round a row differently when fewer than 4 rows reach a thread's kernel, so an eager step
# covers a multiple of 4 rows per torch thread: a row's logits then do not depend on how many rows
# run with it (checked at 1 and 2 threads).
MIN_EAGER_ROWS = 4


def eager_rows(rows: int, max_rows: int) -> int:
    """Rows an eager decode step covers for ``rows`` running rows (idle rows pad it)."""
    block = MIN_EAGER_ROWS * max(1, torch.get_num_threads())
    return min(max_rows, -(-rows // block) * block)


def row_buckets(max_rows: int) -> list[int]:
    return [b for b in ROW_BUCKETS if b < max_rows] + [max_rows]


def length_buckets(max_len: int, smallest: int = MIN_LENGTH_BUCKET) -> list[int]:
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class DecodeRunner:
    """One decode step of ``FastQwen3`` over its first rows, graph-replayed on CUDA."""

    def __init__(self, net: FastQwen3, use_graphs: bool):
        self.net = net
        device = net.embed.device
        self.device = device
        self.use_graphs = bool(use_graphs) and device.type == "cuda"
        self.bucketed = self.use_graphs  # bucketed shapes without graphs: the graph path's maths, eagerly
        self.tokens = torch.zeros(net.max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(net.max_rows, dtype=torch.long, device=device)
        self.logits = torch.zeros((net.max_rows, net.dims.vocab), dtype=torch.float32, device=device)
        self.rows = row_buckets(net.max_rows)
        self.lengths = length_buckets(net.max_len)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None

    def _step(self, rows: int, kv_len: int, row_lengths: list[int] | None = None) -> None:
        self.logits[:rows].copy_(self.net.decode(self.tokens[:rows], self.positions[:rows], kv_len, row_lengths))

    def _load(self, tokens: list[int], positions: list[int], width: int) -> None:
        pad = width - len(tokens)
        host = torch.tensor([list(tokens) + [0] * pad, list(positions) + [0] * pad], dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()
        both = host.to(self.device, non_blocking=True)
        self.tokens[:width].copy_(both[0])
        self.positions[:width].copy_(both[1])

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [len(tokens), V] for token ``tokens[i]`` at ``positions[i]`` in row ``i``
        (idle rows: token 0 at position 0, results ignored)."""
        rows, needed = len(tokens), max(positions) + 1
        if not self.bucketed:
            width = eager_rows(rows, self.net.max_rows)
            self._load(tokens, positions, width)
            # idle rows (token 0 at position 0) attend over one key, as on the graph path
            self._step(width, needed, [p + 1 for p in positions])
            return self.logits[:rows]
        width, kv_len = bucket_for(rows, self.rows), bucket_for(needed, self.lengths)
        self._load(tokens, positions, width)
        if not self.use_graphs:
            self._step(width, kv_len)
            return self.logits[:rows]
        graph = self.graphs.get((width, kv_len))
        if graph is None:
            graph = self._capture(width, kv_len)
        graph.replay()
        return self.logits[:rows]

    def capture_all(self) -> int:
        """Capture every (row, length) bucket up front; returns how many graphs exist. Only while
        no request runs: the warm-up steps write K/V at position 0 of every row."""
        if not self.use_graphs:
            return 0
        for rows in self.rows:
            for kv_len in self.lengths:
                if (rows, kv_len) not in self.graphs:
                    self._load([0] * rows, [0] * rows, rows)
                    self._capture(rows, kv_len)
        return len(self.graphs)

    def _capture(self, rows: int, kv_len: int) -> torch.cuda.CUDAGraph:
        """Capture the step for ``rows`` x ``kv_len`` on the current inputs (the warm-up runs
        compute exactly what the replay computes, so their cache writes are harmless)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(rows, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(rows, kv_len)
        self._pool = graph.pool()
        self.graphs[(rows, kv_len)] = graph
        return graph
