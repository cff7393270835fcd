"""Tiny Qwen-style tokenizers built locally (no hub): byte-level BPE trained on a small corpus,
with the real Qwen3 special tokens and, for the 5 Hz LM, the real ``<|audio_code_N|>`` tokens.

Code never relies on the ids these get: everything looks ids up by string, as it must with the
real checkpoints (where ``<|audio_code_0|>`` is 151669)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2/Qwen3 pre-tokenizer split pattern.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens in id order (151643..151668); `special` as in the real tokenizer_config.
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
NUM_AUDIO_CODE_TOKENS = 65535  # the real vocabulary has 65,535; only 0..63999 are valid codes

_CORPUS = [
    "# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n",
    "# Caption\n# Lyric\n# Metas\n# Languages\n- bpm: N/A\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n",
    "bpm: 120\ncaption: A calm piano piece with soft strings\nduration: 180\nkeyscale: F# minor\nlanguage: en\ntimesignature: 4\n",
    "upbeat electronic dance music with heavy bass and synthesizer leads, energetic rock with electric guitar",
    "[Verse]\n[Chorus]\n[Instrumental]\nWalking down the street today, thinking of the words you used to say",
    "Expand the user's input into a more detailed and specific musical description:",
    "Format the user's input into a more detailed and specific musical description:",
    "Understand the given musical conditions and describe the audio semantics accordingly:",
    "instrumental: true false NO USER INPUT major minor A B C D E F G # b",
    "0123456789 10 20 30 60 90 100 120 128 140 200 300 600 2/4 3/4 4/4 6/8",
]


def _train_base_bpe(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def build_qwen_tokenizer(*, vocab_size: int = 600, audio_codes: bool = False, append_eos: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer with Qwen3's added tokens (and optionally the audio codes).

    ``append_eos`` adds the post-processor the Qwen3-Embedding tokenizer has: every encoded
    sequence gets one more ``<|endoftext|>``."""
    tokenizer = _train_base_bpe(vocab_size)
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    if audio_codes:
        tokenizer.add_special_tokens(
            [AddedToken(f"<|audio_code_{i}|>", special=True, normalized=False) for i in range(NUM_AUDIO_CODE_TOKENS)]
        )
    if append_eos:
        eos_id = tokenizer.token_to_id("<|endoftext|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eos_id)],
        )
    return tokenizer


def save_pretrained_tokenizer(tokenizer: Tokenizer, directory: Path, *, eos_token: str, chat_template: str | None,
                              model_max_length: int = 131072) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ chat_template.jinja) as transformers reads them."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, pad_token="<|endoftext|>", model_max_length=model_max_length,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
