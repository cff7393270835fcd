"""Per-row constrained-decoding state machine (behaviour of the official
``MetadataConstrainedLogitsProcessor``, re-expressed as a compiled program of small ops).

A request's FSM is compiled once into ops (forced token runs, value tries, free-text fields,
codes); ``allowed`` returns the allowed set for the next token as an id tensor (precomputed per state,
``None`` = unconstrained) and ``advance`` consumes the sampled token.
Each row owns its state, so a batch never shares FSM state (upstream: one FSM advanced
with the first sequence's token).

Deviations from upstream, all to keep outputs parseable whatever the model samples:
- after the caption the next field is the next one in the fixed order (upstream lets the model
  pick it with unconstrained tokens); a caption line continues only with a whitespace-led
  token, and the caption's first token must be a " word" token (upstream allows an empty value
  that its own parser then drops);
- free-text values (caption, genres) never contain added/special tokens (EOS, ``<think>``, codes),
  backticks or control characters (upstream bans only codes and one backtick token); the lyrics
  after ``</think>`` exclude added tokens other than EOS (upstream bans only the codes);
- genres (understand/create/format) is one line of free text of at most 64 tokens (upstream's
  genres vocabulary file is absent from its snapshot, which leaves the field unconstrained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch

from acestep.lm import constants as C
from acestep.lm.vocab import TokenTables

PHASES = ("cot", "codes", "understand")
_FORCE_NEWLINE_WHEN_COMPLETE = ("keyscale", "language", "timesignature")


@dataclass(frozen=True)
class FsmSpec:
    """What one generation is constrained to (``_setup_constrained_processor`` settings)."""

    phase: str = "cot"
    skip_caption: bool = False
    skip_language: bool = False
    skip_genres: bool = True
    stop_at_reasoning: bool = False
    user_metadata: Optional[Mapping[str, Any]] = None
    target_codes: Optional[int] = None  # codes phase: exactly this many codes, then EOS

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"invalid generation phase {self.phase!r}; expected one of {PHASES}")


@dataclass(frozen=True)
class Op:
    kind: str  # force | value | caption | genres | eos | free | codes
    tokens: Tuple[int, ...] = ()
    name: str = ""
    limit: int = 0


@dataclass
class FsmState:
    program: Tuple[Op, ...]
    op: int = 0
    pos: int = 0  # tokens emitted inside the current op
    value: Tuple[int, ...] = ()  # value tokens so far (trie fields)
    after_newline: bool = False

    @property
    def current(self) -> Optional[Op]:
        return self.program[self.op] if self.op < len(self.program) else None

    def next_op(self) -> None:
        self.op, self.pos, self.value, self.after_newline = self.op + 1, 0, (), False


def _field_ops(name: str, spec: FsmSpec, tables: TokenTables, encode: Callable[[str], List[int]]) -> List[Op]:
    ops = [Op("force", tables.fixed[f"{name}:"])]
    user = (spec.user_metadata or {}).get(name)
    if user is not None:  # injected verbatim, as upstream (no range check)
        return ops + [Op("force", tuple(encode(f" {user}\n")))]
    if name == "caption":
        return ops + [Op("caption", limit=C.CAPTION_MAX_TOKENS)]
    if name == "genres":
        return ops + [Op("genres", limit=C.GENRES_MAX_TOKENS)]
    return ops + [Op("value", name=name)]


def compile_program(spec: FsmSpec, tables: TokenTables, encode: Callable[[str], List[int]]) -> Tuple[Op, ...]:
    """The op sequence for one request (field order and skips as upstream)."""
    if spec.phase == "codes":  # the phase-2 prompt already holds </think>
        return (Op("codes", limit=spec.target_codes or 0),)
    skipped = {"caption": spec.skip_caption, "language": spec.skip_language, "genres": spec.skip_genres}
    ops: List[Op] = [Op("force", tables.fixed["<think>"]), Op("force", tables.fixed["\n"])]
    for name in C.COT_FIELD_ORDER:
        if not skipped.get(name, False):
            ops += _field_ops(name, spec, tables, encode)
    if spec.phase == "cot" and spec.stop_at_reasoning:
        return tuple(ops + [Op("eos")])  # EOS exactly where </think> would start
    ops.append(Op("force", tables.fixed["</think>"]))
    if spec.phase == "understand":
        return tuple(ops + [Op("free")])
    return tuple(ops + [Op("codes", limit=spec.target_codes or 0)])


def new_state(spec: FsmSpec, tables: TokenTables, encode: Callable[[str], List[int]]) -> FsmState:
    return FsmState(program=compile_program(spec, tables, encode))


Scores = Callable[[torch.Tensor], torch.Tensor]  # ids -> the row's (guided) logits at those ids


def _ids(tables: TokenTables, *ids: int) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=tables.code_ids.device)


def _argmax_id(ids: torch.Tensor, scores_at: Scores) -> int:
    return int(ids[scores_at(ids).argmax()])


def _value_allowed(st: FsmState, op: Op, tables: TokenTables, scores_at: Scores) -> torch.Tensor:
    trie = tables.tries[op.name]
    nxt = trie.get(st.value)
    if nxt is None:
        return _ids(tables, tables.newline_id)  # off the trie (cannot happen when constrained)
    complete = bool((nxt == tables.newline_id).any())
    if complete and op.name in _FORCE_NEWLINE_WHEN_COMPLETE:
        return _ids(tables, tables.newline_id)
    if op.name == "language" and not st.value:
        # Upstream picks the language's first token greedily (argmax among valid first tokens).
        return _ids(tables, _argmax_id(nxt, scores_at))
    return nxt


def _text_allowed(st: FsmState, op: Op, tables: TokenTables, scores_at: Scores) -> Optional[torch.Tensor]:
    """Caption (multi-line YAML scalar) and genres (one line); ``None`` = the field just ended."""
    sets = tables.sets
    if st.pos == 0:
        return sets["text_first"]
    if st.pos >= op.limit and not st.after_newline:
        return _ids(tables, tables.newline_id)
    if not st.after_newline:
        return sets["text_body"]
    if op.kind == "genres" or st.pos >= op.limit:
        return None
    # After a caption line: a whitespace-led argmax continues the YAML scalar, else the field ends.
    if bool(tables.masks["text_continuation"][_argmax_id(sets["text_any"], scores_at)]):
        return sets["text_continuation"]
    return None


def _codes_allowed(st: FsmState, op: Op, tables: TokenTables) -> torch.Tensor:
    if op.limit <= 0:
        return tables.sets["codes_or_eos"]
    return tables.sets["codes_only"] if st.pos < op.limit else _ids(tables, tables.eos_id)


def allowed(st: FsmState, tables: TokenTables, scores_at: Scores) -> Optional[torch.Tensor]:
    """Allowed next tokens as a sorted/precomputed long id tensor, or ``None`` (anything).

    ``scores_at(ids)`` gives the row's current (CFG-guided) logits; the language's first token
    and the end of a caption are decided on them (as upstream). May close a free-text field."""
    while True:
        op = st.current
        if op is None:
            return _ids(tables, tables.eos_id)
        if op.kind == "force":
            return _ids(tables, op.tokens[st.pos])
        if op.kind == "value":
            return _value_allowed(st, op, tables, scores_at)
        if op.kind in ("caption", "genres"):
            out = _text_allowed(st, op, tables, scores_at)
            if out is not None:
                return out
            st.next_op()
            continue
        if op.kind == "eos":
            return _ids(tables, tables.eos_id)
        if op.kind == "free":
            return tables.sets["free_text"]
        return _codes_allowed(st, op, tables)


def advance(st: FsmState, tables: TokenTables, token: int) -> None:
    """Consume the token sampled for this row."""
    op = st.current
    if op is None:
        return
    if op.kind == "force":
        st.pos += 1
        if st.pos >= len(op.tokens):
            st.next_op()
    elif op.kind == "value":
        if token == tables.newline_id:
            st.next_op()
        else:
            st.value += (token,)
    elif op.kind in ("caption", "genres"):
        st.pos += 1
        st.after_newline = token in tables.line_end_ids
        if st.after_newline and op.kind == "genres":
            st.next_op()
    elif op.kind in ("eos",):
        st.next_op()
    elif op.kind == "codes":
        st.pos += 1
