"""Token tables for constrained decoding, built once per tokenizer.

Every id is looked up by string (``<|audio_code_0|>`` is 151669 in the real vocabulary but not in
the demo one). Allowed-token sets are precomputed as boolean masks over the logits width, or as
small id tensors for the value tries, so a decode step only indexes tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Tuple

import re
import unicodedata

import torch

from acestep.lm import constants as C

_CODE_TOKEN_RE = re.compile(r"^<\|audio_code_\d+\|>$")
Trie = Dict[Tuple[int, ...], torch.Tensor]


@dataclass
class TokenTables:
    """Ids, masks ([V] bool, V = logits width) and value tries of one LM vocabulary."""

    vocab_size: int
    eos_id: int
    pad_id: int | None
    newline_id: int
    think_end_id: int
    code_ids: torch.Tensor  # [64000] id of <|audio_code_N|> at index N
    fixed: Dict[str, Tuple[int, ...]]  # forced token sequences for "<think>", "bpm:", ...
    tries: Dict[str, Trie]  # field -> {value-token prefix: allowed next ids (newline = complete)}
    masks: Dict[str, torch.Tensor]  # name -> [V] bool
    sets: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> sorted ids (= mask.nonzero())
    code_value: Dict[int, int] = field(default_factory=dict)  # id -> N
    line_end_ids: frozenset = frozenset()  # tokens whose text ends a line

    def to(self, device: torch.device | str) -> "TokenTables":
        move = lambda t: t.to(device)  # noqa: E731
        return TokenTables(
            vocab_size=self.vocab_size, eos_id=self.eos_id, pad_id=self.pad_id, newline_id=self.newline_id,
            think_end_id=self.think_end_id, code_ids=move(self.code_ids), fixed=self.fixed,
            tries={k: {p: move(v) for p, v in trie.items()} for k, trie in self.tries.items()},
            masks={k: move(v) for k, v in self.masks.items()}, sets={k: move(v) for k, v in self.sets.items()},
            code_value=self.code_value,
            line_end_ids=self.line_end_ids,
        )


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _token_id(tokenizer, text: str) -> int:
    ids = _encode(tokenizer, text)
    if len(ids) != 1:
        raise ValueError(f"tokenizer does not encode {text!r} as one token (got {ids})")
    return ids[0]


def forced_tokens(tokenizer, text: str) -> Tuple[int, ...]:
    """Greedy longest-prefix-that-is-one-token segmentation (the official FSM's fixed strings)."""
    out, pos = [], 0
    while pos < len(text):
        for end in range(len(text), pos, -1):
            ids = _encode(tokenizer, text[pos:end])
            if len(ids) == 1:
                out.append(ids[0])
                pos = end
                break
        else:
            raise ValueError(f"no single token spells a prefix of {text[pos:]!r}")
    return tuple(out)


def build_trie(tokenizer, field_name: str, values: Iterable[str], newline_id: int) -> Dict[Tuple[int, ...], set]:
    """Prefix tree of the value tokens of ``"{field}: {value}"`` after the tokens of ``"{field}:"``."""
    context = _encode(tokenizer, f"{field_name}:")
    trie: Dict[Tuple[int, ...], set] = {}
    for value in values:
        full = _encode(tokenizer, f"{field_name}: {value}")
        if full[: len(context)] != context or len(full) == len(context):
            continue  # the value merged into the context tokens; the official FSM skips it too
        value_ids = full[len(context):]
        for i in range(len(value_ids) + 1):
            nxt = value_ids[i] if i < len(value_ids) else newline_id
            trie.setdefault(tuple(value_ids[:i]), set()).add(nxt)
    return trie


def _token_texts(tokenizer, n: int) -> List[str]:
    # batch_decode runs in Rust; one call for the whole vocabulary.
    return tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in text)


def _text_masks(texts: List[str], special: set, vocab_size: int) -> Dict[str, torch.Tensor]:
    """Boolean masks over the text of every token (computed once at load)."""
    n = len(texts)
    cols = {name: torch.zeros(vocab_size, dtype=torch.bool) for name in
            ("plain", "midline", "line_end", "ws_start", "word_start")}
    # Free text never holds added tokens, backticks or control characters other than \n / \t.
    plain = [i not in special and "`" not in t and t != "" and not _has_control(t) for i, t in enumerate(texts)]
    midline = ["\n" not in t for t in texts]
    line_end = [t.endswith("\n") and t.count("\n") == 1 for t in texts]
    ws_start = [t[:1] in (" ", "\t") and "\n" not in t for t in texts]
    word_start = [t[:1] == " " and t.strip() != "" and "\n" not in t for t in texts]
    cols["added"] = torch.zeros(vocab_size, dtype=torch.bool)
    cols["added"][sorted(special)] = True
    for name, values in (("plain", plain), ("midline", midline), ("line_end", line_end),
                         ("ws_start", ws_start), ("word_start", word_start)):
        cols[name][:n] = torch.tensor(values, dtype=torch.bool)
    return cols


def _add_state_masks(masks: Dict[str, torch.Tensor], eos_id: int) -> None:
    """The per-state allowed sets of the free-text and codes states, combined once."""
    body = masks["plain"] & (masks["midline"] | masks["line_end"])
    masks["text_first"] = masks["plain"] & masks["word_start"]  # a value starts with " word"
    masks["text_body"] = body
    masks["text_continuation"] = masks["plain"] & masks["ws_start"]  # YAML continuation line
    masks["text_any"] = body | masks["text_continuation"]
    # Lyrics after </think>: upstream bans only the codes; added tokens other than EOS are banned too.
    masks["free_text"] = masks["known"] & ~masks["added"]
    masks["free_text"][eos_id] = True
    masks["codes_only"] = masks["code"].clone()
    masks["codes_or_eos"] = masks["code"].clone()
    masks["codes_or_eos"][eos_id] = True


def build_token_tables(tokenizer, vocab_size: int | None = None, max_duration: int = C.DURATION_MAX) -> TokenTables:
    """Look up every id by string and precompute the masks and tries the FSM uses."""
    n_tok = len(tokenizer)
    vocab_size = max(vocab_size or n_tok, n_tok)
    added = tokenizer.get_added_vocab()
    code_ids = [added.get(f"<|audio_code_{i}|>") for i in range(C.MAX_AUDIO_CODE + 1)]
    if any(i is None for i in code_ids):
        raise ValueError("tokenizer lacks the <|audio_code_0..63999|> tokens of the 5 Hz LM")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token")
    newline_id = _encode(tokenizer, "\n")[-1]
    texts = _token_texts(tokenizer, n_tok)
    masks = _text_masks(texts, set(added.values()), vocab_size)
    code_mask = torch.zeros(vocab_size, dtype=torch.bool)
    code_mask[torch.tensor(code_ids)] = True
    masks["code"] = code_mask
    masks["any_code"] = torch.zeros(vocab_size, dtype=torch.bool)  # incl. the 1,535 invalid ones
    masks["any_code"][[i for t, i in added.items() if _CODE_TOKEN_RE.match(t)]] = True
    masks["known"] = torch.zeros(vocab_size, dtype=torch.bool)
    masks["known"][:n_tok] = True
    _add_state_masks(masks, eos_id)
    fixed_texts = ["<think>", "\n", "</think>"] + [f"{f}:" for f in C.COT_FIELD_ORDER]
    value_sets = {
        "bpm": [str(v) for v in range(C.BPM_MIN, C.BPM_MAX + 1)],
        "duration": [str(v) for v in range(C.DURATION_MIN, max_duration + 1)],
        "keyscale": list(C.VALID_KEYSCALES),
        "language": list(C.VALID_LANGUAGES),
        "timesignature": [str(v) for v in C.VALID_TIME_SIGNATURES],
    }
    tries = {f: {p: torch.tensor(sorted(s), dtype=torch.long)
                 for p, s in build_trie(tokenizer, f, vals, newline_id).items()}
             for f, vals in value_sets.items()}
    return TokenTables(
        vocab_size=vocab_size, eos_id=eos_id, pad_id=tokenizer.pad_token_id, newline_id=newline_id,
        think_end_id=_token_id(tokenizer, "</think>"), code_ids=torch.tensor(code_ids, dtype=torch.long),
        fixed={t: forced_tokens(tokenizer, t) for t in fixed_texts}, tries=tries, masks=masks,
        sets={k: torch.nonzero(v).flatten() for k, v in masks.items()},
        code_value={tid: n for n, tid in enumerate(code_ids)},
        line_end_ids=frozenset(torch.nonzero(masks["line_end"]).flatten().tolist()),
    )
