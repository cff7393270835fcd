"""``FastEngine``: continuous-batching paired-CFG decoding on a static KV cache.

Same contract as ``PtRunner.generate`` (generated ids per request, stop token included) and the
same tokens for the same seeds: each request draws from its own ``torch.Generator`` seeded with
its seed, one uniform per sampled step (none when greedy), on the CPU. Per step:

1. the scheduler admits up to ``chunk_size`` waiting requests; each one's prompts are prefilled
   into its slots (the last position's logits wait in the logits buffer);
2. the host plans each running row's allowed set (``masks.plan_row``) and the device samples every
   row at once (``sampler.sample``); one sync fetches (token, decision) per row;
3. the host advances the FSMs, finishes rows (freeing their slots), and runs one decode step (a
   CUDA graph on GPU) feeding each token to both rows of its pair."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from acestep.lm import fsm as F
from acestep.lm.engine import LMRequest
from acestep.lm.fast import masks as M
from acestep.lm.fast.graphs import DecodeRunner
from acestep.lm.fast.model import FastQwen3
from acestep.lm.fast.sampler import SampleInputs, sample
from acestep.lm.fast.scheduler import Job, Scheduler
from acestep.lm.vocab import TokenTables

UNIFORM_BLOCK = 64  # uniforms drawn per refill (the CPU stream equals one draw per step)


@dataclass
class _RowState:
    generator: torch.Generator
    fsm: F.FsmState | None
    uniforms: list[float] = field(default_factory=list)

    def next_uniform(self) -> float:
        if not self.uniforms:
            self.uniforms = torch.rand(UNIFORM_BLOCK, generator=self.generator, dtype=torch.float32).tolist()[::-1]
        return self.uniforms.pop()


class FastEngine:
    """Paired-CFG, FSM-constrained decoding of ``LMRequest``s on a ``Qwen3ForCausalLM``.

    ``max_rows`` KV-cache slots (a CFG request takes two), ``max_len`` positions per slot, up to
    ``chunk_size`` requests join per step. CUDA graphs are used on CUDA unless
    ``use_cuda_graphs=False``; joining prompts prefill in one forward on CUDA unless
    ``batch_prefill=False``; ``decode_attention`` picks the decode attention (``FastQwen3``:
    "gqa" on CUDA, "sdpa" elsewhere). ``check_fsm`` re-checks every sampled token on the host."""

    def __init__(self, model, tables: TokenTables, encode: Callable[[str], list[int]], pad_id: int,
                 max_rows: int = 64, max_len: int = 4096, chunk_size: int = 8,
                 use_cuda_graphs: bool | None = None, check_fsm: bool = False,
                 batch_prefill: bool | None = None, decode_attention: str | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.net = FastQwen3(model, max_rows, max_len, decode_attention)
        graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.decoder = DecodeRunner(self.net, graphs)
        self.tables = tables.to("cpu")  # the FSM's bookkeeping stays on the host
        self.encode, self.pad_id = encode, pad_id
        self.vocab = self.net.dims.vocab
        self.masks = M.MaskTable(self.vocab, self.device)
        self.seen = torch.zeros((max_rows, self.vocab), dtype=torch.bool, device=self.device)
        self.scheduler = Scheduler(max_rows, chunk_size)
        self.stop_ids = {tables.eos_id} | ({tables.pad_id} if tables.pad_id is not None else set())
        self.results: dict[int, list[int]] = {}
        self.check_fsm = check_fsm  # verify every sampled token against the host FSM (tests)
        # one forward for all prompts joining in a step (GPU); per prompt on CPU, where the plain
        # path's fp32 results are reproduced most closely with one-row shapes
        self.batch_prefill = self.device.type == "cuda" if batch_prefill is None else batch_prefill
        self._next_rid = 0

    # -- continuous API ------------------------------------------------------------------------
    def add_request(self, request: LMRequest) -> int:
        """Queue a request; returns its id (its tokens land in ``results[rid]`` when done)."""
        longest = max(len(request.prompt_ids), len(request.uncond_ids or []))
        if longest + max(request.max_new_tokens, 1) > self.net.max_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({request.max_new_tokens}) exceeds "
                             f"the engine's max_len {self.net.max_len}")
        gen = torch.Generator()
        gen.manual_seed(int(request.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        state = F.new_state(request.fsm, self.tables, self.encode) if request.fsm is not None else None
        rid, self._next_rid = self._next_rid, self._next_rid + 1
        slots = 2 if request.sampling.uses_cfg else 1
        self.scheduler.add(Job(rid, request, slots, _RowState(gen, state)))
        return rid

    def capture_cuda_graphs(self) -> int:
        """Capture all decode graphs now instead of on first use (CUDA only; engine idle)."""
        if self.has_unfinished():
            raise RuntimeError("capture the CUDA graphs before adding requests")
        return self.decoder.capture_all()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def pop_result(self, rid: int) -> list[int]:
        return self.results.pop(rid)

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Admit, sample one token for every running request, decode; returns finished ids."""
        joined = self.scheduler.admit()
        if joined:
            self._prefill(joined)
        running = list(self.scheduler.running)
        if not running:
            return []
        picks = self._sample(running)  # the step's one host sync
        done: list[int] = []
        for seq, (token, decision) in zip(running, picks):
            seq.tokens.append(token)
            M.advance_row(seq.state.fsm, self.tables, token, decision, self.check_fsm)
            if token in self.stop_ids or len(seq.tokens) >= seq.request.max_new_tokens:
                self.scheduler.finish(seq)
                self.results[seq.rid] = seq.tokens
                done.append(seq.rid)
        if self.scheduler.running:
            self._decode(self.scheduler.running)
        return done

    def generate(self, requests: Sequence[LMRequest]) -> list[list[int]]:
        """Generated token ids per request (stop token included, prompt excluded)."""
        rids = [self.add_request(r) for r in requests]
        try:
            while self.has_unfinished():
                self.step()
        except BaseException:
            self.abort()
            raise
        return [self.pop_result(rid) for rid in rids]

    def abort(self) -> None:
        """Drop every waiting and running request (their slots are freed, no results)."""
        for job in list(self.scheduler.running):
            self.scheduler.finish(job)
        self.scheduler.waiting.clear()

    # -- tensor work ---------------------------------------------------------------------------
    def _prefill(self, joined: list[Job]) -> None:
        prompts, slots = [], []
        for seq in joined:
            prompts.append(seq.request.prompt_ids)
            slots.append(seq.cond_slot)
            if seq.uncond_slot is not None:
                prompts.append(seq.request.uncond_ids)
                slots.append(seq.uncond_slot)
        logits = self.decoder.logits
        if self.batch_prefill:
            logits[self._ids(slots)] = self.net.prefill_many(prompts, slots)
        else:
            for prompt, slot in zip(prompts, slots):
                logits[slot] = self.net.prefill(self._ids(prompt), slot)
        for seq in joined:
            self.seen[seq.cond_slot] = False
            self.seen[seq.cond_slot, self._ids(seq.request.prompt_ids)] = True

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long).to(self.device, non_blocking=True)

    def _inputs(self, running: list[Job]) -> SampleInputs:
        ints, floats, flags = [], [], []
        use_k = use_p = False
        width = 1
        for seq in running:
            cfg, row = seq.request.sampling, seq.state
            plan = M.plan_row(row.fsm, self.tables, self.masks)
            greedy = cfg.temperature <= 0
            width = max(width, plan.width(self.masks))
            k, p = cfg.effective_top_k, cfg.effective_top_p
            use_k, use_p = use_k or k is not None, use_p or p is not None
            uncond = seq.uncond_slot if seq.uncond_slot is not None else seq.cond_slot
            ints.append([seq.cond_slot, uncond, plan.if_true, plan.if_false, plan.predicate, plan.decide,
                         k if k is not None else self.vocab])
            floats.append([cfg.cfg_scale, 1.0 if greedy else cfg.temperature, cfg.repetition_penalty,
                           p if p is not None else 2.0, 0.0 if greedy else row.next_uniform()])
            flags.append([plan.argmax_one, greedy])
        i = self._upload(torch.tensor(ints, dtype=torch.long).T)
        f = self._upload(torch.tensor(floats, dtype=torch.float32).T)
        b = self._upload(torch.tensor(flags, dtype=torch.bool).T)
        return SampleInputs(cond=i[0], uncond=i[1], plan=i[2:6].T, argmax_one=b[0], greedy=b[1], scale=f[0],
                            temperature=f[1], penalty=f[2], top_k=i[6], top_p=f[3], uniform=f[4], width=width,
                            use_top_k=use_k, use_top_p=use_p)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return host.contiguous().pin_memory().to(self.device, non_blocking=True)
        return host.contiguous()

    def _sample(self, running: list[Job]):
        x = self._inputs(running)
        out = sample(self.decoder.logits, self.masks.masks[: self.masks.size], self.seen[x.cond], x)
        self.seen[x.cond, out[:, 0]] = True
        return out.tolist()

    def _decode(self, running: list[Job]) -> None:
        span = self.scheduler.span()
        tokens, positions = [0] * span, [0] * span
        for seq in running:
            n = len(seq.tokens) - 1  # the new token's index in the completion
            tokens[seq.cond_slot] = seq.tokens[-1]
            positions[seq.cond_slot] = len(seq.request.prompt_ids) + n
            if seq.uncond_slot is not None:
                tokens[seq.uncond_slot] = seq.tokens[-1]
                positions[seq.uncond_slot] = len(seq.request.uncond_ids) + n
        self.decoder.run(tokens, positions)


def build_fast_engine(handler, **kwargs) -> FastEngine:
    """A ``FastEngine`` on an initialized ``LLMHandler``'s pt backend (its model and tables)."""
    runner = getattr(getattr(handler, "llm", None), "runner", None)
    if runner is None:
        raise RuntimeError("build_fast_engine needs an LLMHandler initialized with the pt backend")
    return FastEngine(runner.model, runner.tables, runner.encode, runner.pad_id, **kwargs)
