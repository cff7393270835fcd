"""Device-side constrained decoding: a table of allowed-token masks and a per-row plan into it.

The FSM itself (``acestep.lm.fsm``) stays on the host. Before a step, ``plan_row`` turns a row's
state into a few small integers (which table rows are allowed, and which decision the device must
take on the guided logits); the sampler gathers the masks on the device. After the step's one
sync, ``advance_row`` replays the colleague's ``allowed`` with the device's decision and then
``advance``, exactly the calls ``PtRunner`` makes, so the host state never diverges from it.

Data-dependent states (the only two in the FSM):
- ``argmax_one``: the allowed set is the single argmax of the guided logits over ``decide`` (the
  language's first token);
- branch: ``a`` = argmax of the guided logits over ``decide``; the allowed set is ``if_true`` when
  ``predicate[a]`` else ``if_false`` (a caption line continues iff the argmax over free text is a
  whitespace-led token; otherwise the field ends and the next op's set applies)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from acestep.lm import fsm as F
from acestep.lm.vocab import TokenTables

EMPTY, ALL = 0, 1  # fixed table rows
MAX_ROWS = 4096
CONTINUATION_MASK = "text_continuation"  # the caption-continuation predicate of fsm._text_allowed


class MaskTable:
    """Rows of allowed-token masks ``[rows, V]`` (bool, on the device), added lazily per id set."""

    def __init__(self, vocab: int, device, capacity: int = 64):
        self.vocab, self.device = int(vocab), torch.device(device)
        self.masks = torch.zeros((capacity, self.vocab), dtype=torch.bool, device=self.device)
        self.masks[ALL] = True
        self.size = 2
        self.counts = [0, self.vocab]  # allowed ids per row
        self._rows: dict[object, int] = {}
        self._keep: list[torch.Tensor] = []
        self._ids: dict[int, torch.Tensor] = {}

    def _key(self, ids: torch.Tensor):
        # Large sets are the FSM's precomputed tensors (tables.sets, trie nodes): keyed by identity,
        # kept alive once stored so the id cannot be reused by another tensor.
        return tuple(ids.tolist()) if ids.numel() <= 64 else ("id", id(ids), ids.numel())

    def row(self, ids: torch.Tensor | None) -> int:
        """Table row of the sorted id set ``ids`` (``None`` = everything)."""
        if ids is None:
            return ALL
        key = self._key(ids)
        found = self._rows.get(key)
        if found is not None:
            return found
        if self.size >= MAX_ROWS:
            raise RuntimeError(f"more than {MAX_ROWS} distinct allowed sets: is the FSM building new large "
                               "id tensors per step? (the table keys them by identity)")
        if self.size == self.masks.shape[0]:
            grown = torch.zeros((2 * self.size, self.vocab), dtype=torch.bool, device=self.device)
            grown[: self.size] = self.masks
            self.masks = grown
        if key[:1] == ("id",):
            self._keep.append(ids)
        ids = ids.cpu()
        ids = ids[ids < self.vocab]
        self.masks[self.size, ids.to(self.device)] = True
        self.counts.append(int(ids.numel()))
        self._rows[key] = self.size
        self.size += 1
        return self.size - 1

    def ids(self, row: int) -> torch.Tensor:
        """The ascending allowed ids of table row ``row`` (on the device, computed once)."""
        found = self._ids.get(row)
        if found is None:
            found = self._ids[row] = torch.nonzero(self.masks[row]).flatten()
        return found

    def row_of_mask(self, name: str, mask: torch.Tensor) -> int:
        key = ("mask", name)
        if key not in self._rows:
            self._rows[key] = self.row(torch.nonzero(mask[: self.vocab]).flatten())
        return self._rows[key]


@dataclass(frozen=True)
class RowPlan:
    """What the device needs to know about one row's allowed set this step."""

    if_true: int = ALL
    if_false: int = ALL
    predicate: int = EMPTY  # table row indexed at the decision token
    decide: int = EMPTY  # table row: the set the decision's argmax runs over
    argmax_one: bool = False

    @classmethod
    def static(cls, row: int) -> RowPlan:
        return cls(row, row, EMPTY, EMPTY, False)

    def width(self, table: MaskTable) -> int:
        """How many ids the row may allow (the sampler's compacted width)."""
        return 1 if self.argmax_one else max(table.counts[self.if_true], table.counts[self.if_false])


UNCONSTRAINED = RowPlan.static(ALL)


class _NeedsScores(Exception):
    def __init__(self, ids: torch.Tensor, op: F.Op | None):
        super().__init__("data-dependent FSM state")
        self.ids, self.op = ids, op


def _pick(token: int):
    """A ``scores_at`` whose argmax over any id set is ``token`` (when present)."""
    return lambda ids: (ids == token).float()


def _probe(state: F.FsmState, tables: TokenTables):
    """``allowed`` on a copy of ``state``: (ids, None) if static, else raises ``_NeedsScores``."""
    st = copy.copy(state)

    def scores_at(ids):
        raise _NeedsScores(ids, st.current)

    return F.allowed(st, tables, scores_at)


def plan_row(state: F.FsmState | None, tables: TokenTables, table: MaskTable) -> RowPlan:
    """The device plan of one row's next token (``tables`` on the host)."""
    if state is None:
        return UNCONSTRAINED
    try:
        return RowPlan.static(table.row(_probe(state, tables)))
    except _NeedsScores as need:
        ids, op = need.ids, need.op
    decide = table.row(ids)
    if op is not None and op.kind == "value":
        return RowPlan(EMPTY, EMPTY, EMPTY, decide, True)
    cont = tables.masks[CONTINUATION_MASK]
    in_pred = cont[ids]
    outcomes = {}
    for flag in (True, False):
        pick = ids[in_pred == flag]
        if pick.numel():
            outcomes[flag] = table.row(F.allowed(copy.copy(state), tables, _pick(int(pick[0]))))
    if len(outcomes) == 1:
        return RowPlan.static(next(iter(outcomes.values())))
    return RowPlan(outcomes[True], outcomes[False], table.row_of_mask(CONTINUATION_MASK, cont), decide, False)


def advance_row(state: F.FsmState | None, tables: TokenTables, token: int, decision: int,
                check: bool = False) -> None:
    """The host FSM's ``allowed`` (deciding as the device did) then ``advance`` with ``token``.
    ``check``: raise if the device sampled a token the host FSM does not allow (a plan bug)."""
    if state is None:
        return
    ids = F.allowed(state, tables, _pick(decision))
    if check and ids is not None and not bool((ids == token).any()):
        raise AssertionError(f"device sampled {token}, outside the FSM's allowed set at op {state.current}")
    F.advance(state, tables, token)
