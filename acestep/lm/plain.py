"""The plain path: paired-CFG decoding on a transformers causal LM with its ``DynamicCache``.

It is the reference the engine (``acestep.lm.engine``) is tested against, and the baseline of
``bench``; serving never uses it.

Every request is one conditional row, plus one unconditional row when its ``cfg_scale`` > 1.
All rows decode together in one batch sharing one ``DynamicCache``: prompts are left-padded,
masked, and given position ids that start at 0 on each row's first real token, so a row computes
what it would compute alone. Per step the runner mixes ``uncond + s·(cond − uncond)``, applies the
row's FSM and sampling, and feeds the one sampled token to both rows of the pair. Finished rows
are dropped from the batch (and from the cache) as soon as they stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from transformers import DynamicCache

from acestep.lm import fsm as F
from acestep.lm.engine.graphs import MIN_EAGER_ROWS
from acestep.lm.request import LMRequest
from acestep.lm.sampling import cfg_mix, sample_token
from acestep.lm.vocab import TokenTables


@dataclass(eq=False)  # rows compare by identity
class _Row:
    """Decoding state of one request (bookkeeping only, no tensors but its generator)."""

    request: LMRequest
    generator: torch.Generator
    fsm: Optional[F.FsmState]
    tokens: List[int] = field(default_factory=list)
    finished: bool = False


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [R, L], attention mask [R, L] and position ids (0 at each row's first real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class PtRunner:
    """Runs batches of ``LMRequest`` on a transformers ``*ForCausalLM``."""

    def __init__(self, model, tables: TokenTables, encode: Callable[[str], List[int]], pad_id: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.tables = tables.to(self.device)
        self.encode = encode
        self.pad_id = pad_id
        self.stop_ids = {tables.eos_id} | ({tables.pad_id} if tables.pad_id is not None else set())

    @property
    def ghost_rows(self) -> int:
        """Idle copies of the first prompt decoded along: they keep every CPU GEMM at >= 4 rows, as
        in the engine, so at one torch thread (as the tests run) a row's rounding never depends on
        its batch's size."""
        return MIN_EAGER_ROWS - 1 if self.device.type == "cpu" else 0

    # -- bookkeeping -----------------------------------------------------------------------
    def _new_row(self, req: LMRequest) -> _Row:
        gen = torch.Generator()  # CPU on every device: the fast path draws the same stream
        gen.manual_seed(int(req.seed) & 0xFFFF_FFFF_FFFF_FFFF)
        state = F.new_state(req.fsm, self.tables, self.encode) if req.fsm is not None else None
        return _Row(req, gen, state)

    def _finish_step(self, live: List[_Row], tokens: torch.Tensor) -> None:
        for row, tok in zip(live, tokens.tolist()):
            row.tokens.append(tok)
            if row.fsm is not None:
                F.advance(row.fsm, self.tables, tok)
            if tok in self.stop_ids or len(row.tokens) >= row.request.max_new_tokens:
                row.finished = True

    # -- tensor work -------------------------------------------------------------------------
    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _sample_row(self, row: _Row, cond: torch.Tensor, uncond: Optional[torch.Tensor]) -> int:
        cfg = row.request.sampling

        def scores_at(ids: Optional[torch.Tensor]) -> torch.Tensor:
            c = cond if ids is None else cond[ids]
            return c.float() if uncond is None else cfg_mix(c, uncond if ids is None else uncond[ids], cfg.cfg_scale)

        ids = F.allowed(row.fsm, self.tables, scores_at) if row.fsm is not None else None
        history = None
        if cfg.repetition_penalty != 1.0:
            history = torch.tensor(row.request.prompt_ids + row.tokens, device=cond.device)
        return sample_token(scores_at(ids), ids, cfg, row.generator, history)

    def _sample(self, logits: torch.Tensor, live: List[_Row], paired: List[_Row]) -> torch.Tensor:
        """One token per live row; a paired row's guided logits mix its cond and uncond rows."""
        uncond_row = {id(r): len(live) + j for j, r in enumerate(paired)}
        tokens = [self._sample_row(r, logits[i], logits[uncond_row[id(r)]] if id(r) in uncond_row else None)
                  for i, r in enumerate(live)]
        return torch.tensor(tokens, dtype=torch.long, device=logits.device)

    @torch.inference_mode()
    def generate(self, requests: Sequence[LMRequest]) -> List[List[int]]:
        """Generated token ids per request (stop token included, prompt excluded)."""
        rows = [self._new_row(r) for r in requests]
        live, paired = list(rows), [r for r in rows if r.request.sampling.uses_cfg]
        ghosts = self.ghost_rows
        prompts = [r.request.prompt_ids for r in live] + [r.request.uncond_ids for r in paired]
        prompts += [requests[0].prompt_ids] * ghosts
        ids, mask, positions = left_pad(prompts, self.pad_id, self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        next_pos = positions[:, -1] + 1
        idle = torch.full((ghosts,), self.pad_id, dtype=torch.long, device=self.device)
        while live:
            tokens = self._sample(logits, live, paired)
            self._finish_step(live, tokens)
            step_tokens = torch.cat([tokens, tokens[[live.index(r) for r in paired]], idle])
            keep = [i for i, r in enumerate(live) if not r.finished]
            keep += [len(live) + j for j, r in enumerate(paired) if not r.finished]
            keep += range(len(live) + len(paired), len(live) + len(paired) + ghosts)
            if len(keep) < mask.shape[0]:
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, step_tokens = mask[index], next_pos[index], step_tokens[index]
                live, paired = [r for r in live if not r.finished], [r for r in paired if not r.finished]
            if not live:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = self._forward(step_tokens.unsqueeze(1), mask, next_pos.unsqueeze(1), cache)
            next_pos = next_pos + 1
        return [r.tokens for r in rows]
