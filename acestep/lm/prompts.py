"""The official LM prompts, byte for byte (``build_formatted_prompt*`` of upstream llm_inference.py).

Every prompt is a [system, user] (+ assistant) chat rendered with the checkpoint's own chat
template; ``render`` is ``tokenizer.apply_chat_template(..., tokenize=False)``. Builders are pure
functions of their inputs."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

import yaml

from acestep.lm import constants as C

Render = Callable[[List[Dict[str, str]], bool], str]


def chat_renderer(tokenizer) -> Render:
    def render(messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return render


def _system(instruction: str) -> Dict[str, str]:
    return {"role": "system", "content": f"# Instruction\n{instruction}\n\n"}


def _ask(render: Render, instruction: str, user: str) -> str:
    return render([_system(instruction), {"role": "user", "content": user}], True)


def has_meaningful_negative_prompt(negative_prompt: Optional[str]) -> bool:
    return bool(negative_prompt and negative_prompt.strip() and negative_prompt.strip() != C.NO_USER_INPUT)


def cot_prompt(render: Render, caption: str, lyrics: str) -> str:
    """Phase 1 (CoT metadata), conditional."""
    return _ask(render, C.DEFAULT_LM_INSTRUCTION, f"# Caption\n{caption or ''}\n\n# Lyric\n{lyrics or ''}\n")


def cot_uncond_prompt(render: Render, lyrics: str, negative_prompt: str = C.NO_USER_INPUT) -> str:
    """Phase 1 unconditional: caption section dropped, or replaced by a meaningful negative prompt."""
    if has_meaningful_negative_prompt(negative_prompt):
        user = f"# Caption\n{negative_prompt}\n\n# Lyric\n{lyrics or ''}\n"
    else:
        user = f"# Lyric\n{lyrics or ''}\n"
    return _ask(render, C.DEFAULT_LM_INSTRUCTION, user)


def _with_cot(render: Render, caption: str, lyrics: str, cot_text: str) -> str:
    messages = [
        _system(C.DEFAULT_LM_INSTRUCTION),
        {"role": "user", "content": f"# Caption\n{caption or ''}\n\n# Lyric\n{lyrics or ''}\n"},
        {"role": "assistant", "content": cot_text},
    ]
    # The Qwen3 template closes the assistant turn: the prompt ends "</think>\n\n<|im_end|>\n".
    formatted = render(messages, False)
    return formatted if formatted.endswith("\n") else formatted + "\n"


def codes_prompt(render: Render, caption: str, lyrics: str, cot_text: str) -> str:
    """Phase 2 (audio codes), conditional: the user caption + the re-serialised CoT."""
    return _with_cot(render, caption, lyrics, cot_text)


def codes_uncond_prompt(render: Render, caption: str, lyrics: str, negative_prompt: str = C.NO_USER_INPUT) -> str:
    """Phase 2 unconditional: empty CoT; the caption stays unless a negative prompt replaces it."""
    use = negative_prompt if has_meaningful_negative_prompt(negative_prompt) else caption
    return _with_cot(render, use, lyrics, "<think>\n</think>")


def create_sample_prompt(render: Render, query: str, instrumental: bool = False) -> str:
    """create_sample ("inspiration"): blank query → ``NO USER INPUT``."""
    query = query if query and query.strip() else C.NO_USER_INPUT
    flag = "true" if instrumental else "false"
    return _ask(render, C.DEFAULT_LM_INSPIRED_INSTRUCTION, f"{query}\n\ninstrumental: {flag}")


def format_sample_prompt(render: Render, caption: str, lyrics: str) -> str:
    """format_sample: no trailing newline after the lyrics; blanks → NO USER INPUT / [Instrumental]."""
    caption = caption if caption and caption.strip() else C.NO_USER_INPUT
    lyrics = lyrics if lyrics and lyrics.strip() else "[Instrumental]"
    return _ask(render, C.DEFAULT_LM_REWRITE_INSTRUCTION, f"# Caption\n{caption}\n\n# Lyric\n{lyrics}")


def understand_prompt(render: Render, audio_codes: str) -> str:
    """understand_music: the bare code string as the user turn (blank → NO USER INPUT)."""
    codes = audio_codes if audio_codes and audio_codes.strip() else C.NO_USER_INPUT
    return _ask(render, C.DEFAULT_LM_UNDERSTAND_INSTRUCTION, codes)


def no_cfg_uncond_prompt(render: Render, instruction: str, negative_prompt: str = C.NO_USER_INPUT) -> str:
    """The unconditional prompt upstream builds (but never uses) for create/format/understand."""
    user = negative_prompt if negative_prompt and negative_prompt.strip() else ""
    return _ask(render, instruction, user)


def format_metadata_as_cot(metadata: Mapping[str, Any]) -> str:
    """``<think>\\n{yaml}\\n</think>`` exactly as upstream ``_format_metadata_as_cot`` (PyYAML dump)."""
    items: Dict[str, Any] = {}
    for key in C.COT_YAML_KEYS:
        value = metadata.get(key)
        if value is None:
            continue
        if key == "timesignature" and isinstance(value, str) and value.endswith("/4"):
            value = value.split("/")[0]
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        items[key] = value
    body = yaml.dump(items, allow_unicode=True, sort_keys=True).strip() if items else ""
    return f"<think>\n{body}\n</think>"


def template_renderer(template: str) -> Render:
    """Render with a chat-template string alone (no tokenizer), as transformers does:
    sandboxed jinja2 with ``trim_blocks``/``lstrip_blocks``."""
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    compiled = env.from_string(template)

    def render(messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt)
    return render
