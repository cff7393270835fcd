"""``LMEngine``: the one LM engine -- continuous-batching paired-CFG decoding on a static KV cache.

Requests join and leave between decode steps. Each request draws from its own ``torch.Generator``
seeded with its seed (one uniform per sampled step, none when greedy, on the CPU), keeps its own
positions and FSM, so its tokens do not depend on its batch-mates; they equal the plain path's
(``acestep.lm.plain.PtRunner``, the test oracle). Per step:

1. the scheduler admits up to ``max_admit_per_step`` waiting requests (first come first served,
   while KV rows are free); each one's prompts are prefilled into its rows;
2. the host plans each running row's allowed set (``masks.plan_row``) and the device samples every
   row at once (``sampler.sample``); one sync fetches (token, decision) per row;
3. the host advances the FSMs, finishes rows (freeing their rows), and runs one decode step (a
   CUDA graph on GPU) feeding each token to both rows of its pair.

A request whose own work raises (its prefill, its row's plan, its sampling, its FSM advance) fails
alone: a batched prefill or sampling call that raises runs again on halves of its rows
(``acestep.steploop.isolate``), and the request's rows are freed. Only a failed decode step, one
forward over every row's cache, fails every request it carried.

The engine is single-threaded bookkeeping plus tensor work, a stepper (``add`` / ``abort`` /
``has_work`` / ``step``) that one ``acestep.steploop.StepLoop`` thread drives for concurrent callers."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from acestep.lm import fsm as F
import acestep.lm.engine.masks as M
from acestep.lm.engine.graphs import DecodeRunner
from acestep.lm.engine.model import FastQwen3
from acestep.lm.engine.sampler import SampleInputs, sample
from acestep.lm.engine.scheduler import LMSequence, Scheduler
from acestep.lm.request import LMRequest, StepCallback
from acestep.lm.vocab import TokenTables
from acestep.steploop import Outcome, isolate

logger = logging.getLogger(__name__)
UNIFORM_BLOCK = 64  # uniforms drawn per refill (the CPU stream equals one draw per step)


@dataclass
class _RowState:
    generator: torch.Generator
    fsm: F.FsmState | None
    on_step: StepCallback | None = None
    uniforms: list[float] = field(default_factory=list)

    def next_uniform(self) -> float:
        if not self.uniforms:
            self.uniforms = torch.rand(UNIFORM_BLOCK, generator=self.generator, dtype=torch.float32).tolist()[::-1]
        return self.uniforms.pop()


@dataclass(frozen=True)
class EngineSettings:
    """Limits and kernels of one ``LMEngine`` (``serve/config.py`` exposes the same fields).

    max_rows: KV-cache rows; a CFG request takes two, so ``max_rows // 2`` CFG requests decode at once.
    max_len: positions per row (prompt + completion).
    max_admit_per_step: most requests that join between two decode steps (each join costs a prefill).
    use_cuda_graphs / batch_prefill / decode_attention: ``None`` = the device's default (graphs, one
    prefill forward for all joiners and grouped-query decode attention on CUDA; eager, one prefill
    per prompt and SDPA on CPU, where one-row shapes reproduce the plain path's rounding best).
    check_fsm: re-check every sampled token against the host FSM (tests)."""

    max_rows: int = 64
    max_len: int = 4096
    max_admit_per_step: int = 8
    use_cuda_graphs: Optional[bool] = None
    batch_prefill: Optional[bool] = None
    decode_attention: Optional[str] = None
    check_fsm: bool = False

    def __post_init__(self):
        if self.max_rows < 2:
            raise ValueError(f"max_rows must be >= 2 (one CFG pair), got {self.max_rows}")
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if self.max_admit_per_step < 1:
            raise ValueError(f"max_admit_per_step must be >= 1, got {self.max_admit_per_step}")


@dataclass
class _Row:
    """One running request's sampling inputs for this step (host lists, packed with the others)."""

    seq: LMSequence
    ints: list[int]
    floats: list[float]
    flags: list[bool]  # argmax_one, greedy, uses top-k, uses top-p
    plan: M.RowPlan


ENGINE_DEFAULTS = EngineSettings()
_GROUPS_KEPT = 1024  # per-group peaks remembered for stats


class LMEngine:
    """Paired-CFG, FSM-constrained decoding of ``LMRequest``s on a ``Qwen3ForCausalLM``."""

    def __init__(self, model, tables: TokenTables, encode: Callable[[str], list[int]], pad_id: int,
                 settings: EngineSettings = ENGINE_DEFAULTS):
        self.settings = settings
        self.model = model
        self.device = next(model.parameters()).device
        self.net = FastQwen3(model, settings.max_rows, settings.max_len, settings.decode_attention)
        graphs = self.device.type == "cuda" if settings.use_cuda_graphs is None else settings.use_cuda_graphs
        self.decoder = DecodeRunner(self.net, graphs)
        self.tables = tables.to("cpu")  # the FSM's bookkeeping stays on the host
        self.encode, self.pad_id = encode, pad_id
        self.vocab = self.net.dims.vocab
        self.masks = M.MaskTable(self.vocab, self.device)
        self.seen = torch.zeros((settings.max_rows, self.vocab), dtype=torch.bool, device=self.device)
        self.scheduler = Scheduler(settings.max_rows, settings.max_admit_per_step)
        self.stop_ids = {tables.eos_id} | ({tables.pad_id} if tables.pad_id is not None else set())
        self._left: list[Outcome] = []  # requests that left during the current step
        self.check_fsm = settings.check_fsm
        self.batch_prefill = self.device.type == "cuda" if settings.batch_prefill is None else settings.batch_prefill
        self._sequences: dict[int, LMSequence] = {}
        self._next_rid = 0
        self._counts: Counter = Counter()
        self._rows_per_step: Counter = Counter()  # KV rows decoding in one step -> steps
        self._group_live: Counter = Counter()
        self._group_peak: OrderedDict[str, int] = OrderedDict()

    # -- continuous API ------------------------------------------------------------------------
    def check(self, request: LMRequest) -> None:
        """Raise ValueError if ``request`` can never run here (thread-safe: reads settings only)."""
        longest = request.longest_prompt
        if longest + max(request.max_new_tokens, 1) > self.net.max_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({request.max_new_tokens}) exceeds "
                             f"the engine's max_len {self.net.max_len}")
        if request.rows > self.settings.max_rows:
            raise ValueError(f"request needs {request.rows} rows; the engine has {self.settings.max_rows}")

    def add(self, request: LMRequest, on_step: Optional[StepCallback] = None) -> int:
        """Queue a request; returns its id (``step`` reports its tokens in an ``Outcome`` when it
        finishes). ``on_step(tokens_done)`` runs after every step it takes part in; it must be quick."""
        self.check(request)
        gen = torch.Generator()
        gen.manual_seed(int(request.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        state = F.new_state(request.fsm, self.tables, self.encode) if request.fsm is not None else None
        rid, self._next_rid = self._next_rid, self._next_rid + 1
        job = LMSequence(rid, request, request.rows, _RowState(gen, state, on_step), tenant=request.tenant,
                         priority=request.priority)
        self.scheduler.add(job)
        self._sequences[rid] = job
        self._counts["added"] += 1
        self._enter_group(request.group)
        return rid

    def abort(self, rid: int) -> bool:
        """Drop one waiting or running request (its rows are freed at once, no result)."""
        job = self._sequences.pop(rid, None)
        if job is None:
            return False
        self.scheduler.drop(job)
        self._counts["aborted"] += 1
        self._leave_group(job.request.group)
        return True

    def abort_all(self) -> list[int]:
        """Drop every waiting and running request; returns their ids."""
        rids = list(self._sequences)
        for rid in rids:
            self.abort(rid)
        return rids

    def capture_cuda_graphs(self) -> int:
        """Capture all decode graphs now instead of on first use (CUDA only; engine idle)."""
        if self.has_work:
            raise RuntimeError("capture the CUDA graphs before adding requests")
        return self.decoder.capture_all()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished

    @torch.inference_mode()
    def step(self) -> list[Outcome]:
        """Admit, sample one token for every running request, decode; returns the requests that
        left: finished (their generated ids, stop token included) and failed (their error)."""
        self._left = []
        joined = self.scheduler.admit()
        if joined:
            self._prefill(joined)
        running = list(self.scheduler.running)
        if not running:
            return self._left
        rows = self._rows(running)
        for row, pick in zip(rows, isolate(self._sample, rows)):  # the step's one host sync
            try:
                if isinstance(pick, Exception):
                    raise pick
                self._advance(row.seq, *pick)
            except Exception as error:  # noqa: BLE001 - this request only
                self._fail(row.seq, error)
        self._count_step(running)
        if self.scheduler.running:
            try:
                self._decode(self.scheduler.running)
            except Exception as error:  # noqa: BLE001 - one forward over every row's cache
                for seq in list(self.scheduler.running):
                    self._fail(seq, error)
        self._report(self.scheduler.running)
        return self._left

    @staticmethod
    def _report(running: list[LMSequence]) -> None:
        for seq in running:
            if seq.state.on_step is not None:
                try:
                    seq.state.on_step(len(seq.tokens))
                except Exception:  # progress is best effort; decoding goes on
                    logger.exception("LM progress callback failed")

    def _advance(self, seq: LMSequence, token: int, decision: int) -> None:
        seq.tokens.append(token)
        M.advance_row(seq.state.fsm, self.tables, token, decision, self.check_fsm)
        if token in self.stop_ids or len(seq.tokens) >= seq.request.max_new_tokens:
            self._finish(seq)

    def _count_step(self, running: list[LMSequence]) -> None:
        rows = sum(seq.rows_needed for seq in running)
        self._counts["steps"] += 1
        self._counts["tokens"] += len(running)
        self._counts["peak_rows_in_use"] = max(self._counts["peak_rows_in_use"], rows)
        self._rows_per_step[rows] += 1

    def generate(self, requests: Sequence[LMRequest]) -> list[list[int]]:
        """Generated token ids per request (stop token included, prompt excluded); single caller.
        Raises the first failed request's error once every request has left."""
        rids = [self.add(r) for r in requests]
        outcomes: dict[int, Outcome] = {}
        try:
            while self.has_work:
                outcomes.update((o.key, o) for o in self.step())
        except BaseException:
            self.abort_all()
            raise
        return [outcomes[rid].get() for rid in rids]

    def stats(self) -> dict[str, Any]:
        """Rows in use and their peak, running / waiting requests, steps, tokens, steps by KV rows
        decoding in them (``rows_per_step``), and the peak number of requests each recent group held
        in the engine at once (``group_peaks``)."""
        counts = dict(self._counts)
        return {
            "max_rows": self.settings.max_rows, "max_admit_per_step": self.settings.max_admit_per_step,
            "rows_in_use": self.scheduler.rows_in_use, "peak_rows_in_use": counts.get("peak_rows_in_use", 0),
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "steps": counts.get("steps", 0), "tokens": counts.get("tokens", 0),
            "requests_added": counts.get("added", 0), "requests_finished": counts.get("finished", 0),
            "requests_aborted": counts.get("aborted", 0), "requests_failed": counts.get("failed", 0),
            "group_peaks": dict(self._group_peak),
            "rows_per_step": dict(sorted(dict(self._rows_per_step).items())),
        }

    def _finish(self, seq: LMSequence) -> None:
        self.scheduler.finish(seq)
        self._sequences.pop(seq.rid, None)
        self._counts["finished"] += 1
        self._leave_group(seq.request.group)
        self._left.append(Outcome(seq.rid, result=seq.tokens))

    def _fail(self, seq: LMSequence, error: Exception) -> None:
        """A request whose own work raised leaves with ``error`` (its rows freed)."""
        logger.error("LM request %d failed: %r", seq.rid, error)
        self.scheduler.drop(seq)
        self._sequences.pop(seq.rid, None)
        self._counts["failed"] += 1
        self._leave_group(seq.request.group)
        self._left.append(Outcome(seq.rid, error=error))

    def _enter_group(self, group: Optional[str]) -> None:
        if group is None:
            return
        self._group_live[group] += 1
        self._group_peak[group] = max(self._group_peak.get(group, 0), self._group_live[group])
        self._group_peak.move_to_end(group)
        while len(self._group_peak) > _GROUPS_KEPT:
            self._group_peak.popitem(last=False)

    def _leave_group(self, group: Optional[str]) -> None:
        if group is not None:
            self._group_live[group] -= 1
            if self._group_live[group] <= 0:
                del self._group_live[group]

    # -- tensor work ---------------------------------------------------------------------------
    def _prefill(self, joined: list[LMSequence]) -> None:
        """Prefill the joiners' prompts; a joiner whose own prefill raises fails."""
        for seq, outcome in zip(joined, isolate(self._prefill_rows, joined)):
            if isinstance(outcome, Exception):
                self._fail(seq, outcome)

    def _prefill_rows(self, joined: list[LMSequence]) -> list[None]:
        prompts, rows = [], []
        for seq in joined:
            prompts.append(seq.request.prompt_ids)
            rows.append(seq.cond_row)
            if seq.uncond_row is not None:
                prompts.append(seq.request.uncond_ids)
                rows.append(seq.uncond_row)
        logits = self.decoder.logits
        if self.batch_prefill:
            logits[self._ids(rows)] = self.net.prefill_many(prompts, rows)
        else:
            for prompt, row in zip(prompts, rows):
                logits[row] = self.net.prefill(self._ids(prompt), row)
        for seq in joined:
            self.seen[seq.cond_row] = False
            self.seen[seq.cond_row, self._ids(seq.request.prompt_ids)] = True
        return [None] * len(joined)

    def _ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long).to(self.device, non_blocking=True)

    def _rows(self, running: list[LMSequence]) -> list[_Row]:
        """Each running request's inputs for this step (drawn once: a retried sampling call reuses
        them); a request whose own plan raises fails."""
        rows = []
        for seq in running:
            try:
                rows.append(self._row(seq))
            except Exception as error:  # noqa: BLE001 - this request only
                self._fail(seq, error)
        return rows

    def _row(self, seq: LMSequence) -> _Row:
        cfg, state = seq.request.sampling, seq.state
        plan = M.plan_row(state.fsm, self.tables, self.masks)
        greedy = cfg.temperature <= 0
        k, p = cfg.effective_top_k, cfg.effective_top_p
        uncond = seq.uncond_row if seq.uncond_row is not None else seq.cond_row
        ints = [seq.cond_row, uncond, plan.if_true, plan.if_false, plan.predicate, plan.decide,
                k if k is not None else self.vocab]
        floats = [cfg.cfg_scale, 1.0 if greedy else cfg.temperature, cfg.repetition_penalty,
                  p if p is not None else 2.0, 0.0 if greedy else state.next_uniform()]
        return _Row(seq, ints, floats, [plan.argmax_one, greedy, k is not None, p is not None], plan)

    def _inputs(self, rows: list[_Row]) -> SampleInputs:
        plans = [r.plan for r in rows]
        i = self._upload(torch.tensor([r.ints for r in rows], dtype=torch.long).T)
        f = self._upload(torch.tensor([r.floats for r in rows], dtype=torch.float32).T)
        b = self._upload(torch.tensor([r.flags for r in rows], dtype=torch.bool).T)
        static = {p.if_true for p in plans if not p.argmax_one and p.if_true == p.if_false}
        any_decision = any(p.argmax_one or p.if_true != p.if_false for p in plans)
        shared = self.masks.ids(static.pop()) if len(static) == 1 and not any_decision else None
        return SampleInputs(cond=i[0], uncond=i[1], plan=i[2:6].T, argmax_one=b[0], greedy=b[1], scale=f[0],
                            temperature=f[1], penalty=f[2], top_k=i[6], top_p=f[3], uniform=f[4],
                            width=max([1] + [p.width(self.masks) for p in plans]),
                            use_top_k=any(r.flags[2] for r in rows), use_top_p=any(r.flags[3] for r in rows),
                            any_decision=any_decision,
                            any_penalty=any(r.floats[2] != 1.0 for r in rows),
                            any_greedy=any(r.flags[1] for r in rows), shared_ids=shared)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return host.contiguous().pin_memory().to(self.device, non_blocking=True)
        return host.contiguous()

    def _sample(self, rows: list[_Row]) -> list[list[int]]:
        """[token, decision] per row."""
        x = self._inputs(rows)
        out = sample(self.decoder.logits, self.masks.masks[: self.masks.size], self.seen[x.cond], x)
        self.seen[x.cond, out[:, 0]] = True
        return out.tolist()

    def _decode(self, running: list[LMSequence]) -> None:
        span = self.scheduler.span()
        tokens, positions = [0] * span, [0] * span
        for seq in running:
            n = len(seq.tokens) - 1  # the new token's index in the completion
            tokens[seq.cond_row] = seq.tokens[-1]
            positions[seq.cond_row] = len(seq.request.prompt_ids) + n
            if seq.uncond_row is not None:
                tokens[seq.uncond_row] = seq.tokens[-1]
                positions[seq.uncond_row] = len(seq.request.uncond_ids) + n
        self.decoder.run(tokens, positions)

