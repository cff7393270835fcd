"""The ``acestep`` console script. Subcommands that need Ray import serve/ or pipelines/ only
when they run, so ``import acestep`` never pulls in Ray."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="render music in-process (no Ray)")
    p.add_argument("--checkpoints", required=True, help="checkpoints root (acestep-v15-*/, vae/, Qwen3-Embedding-0.6B/)")
    p.add_argument("--config", default="acestep-v15-turbo", help="DiT folder name or diffusers repo path")
    p.add_argument("--lm", default=None, help="5 Hz LM folder name under --checkpoints (omit for DiT only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--caption", default="")
    p.add_argument("--lyrics", default="")
    p.add_argument("--duration", type=float, default=-1.0)
    p.add_argument("--bpm", type=int, default=None)
    p.add_argument("--keyscale", default="")
    p.add_argument("--timesignature", default="")
    p.add_argument("--task", default="text2music", dest="task_type")
    p.add_argument("--src-audio", default=None)
    p.add_argument("--reference-audio", default=None)
    p.add_argument("--steps", type=int, default=8, dest="inference_steps")
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--infer-method", default="ode")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--format", default="flac", dest="audio_format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--params-json", default=None, help="JSON file of extra GenerationParams fields")


def run_generate(args) -> int:
    from tqdm import tqdm

    from acestep.handler import AceStepHandler
    from acestep.inference import GenerationConfig, GenerationParams, generate_music

    fields = {k: getattr(args, k) for k in ("caption", "lyrics", "duration", "bpm", "keyscale", "timesignature",
                                            "task_type", "inference_steps", "shift", "infer_method", "seed")}
    fields.update(src_audio=args.src_audio, reference_audio=args.reference_audio, thinking=bool(args.lm))
    if args.params_json:
        fields.update(json.loads(open(args.params_json).read()))
    params = GenerationParams(**fields)
    config = GenerationConfig(batch_size=args.batch_size, audio_format=args.audio_format,
                              use_random_seed=args.seed < 0)
    dit = AceStepHandler()
    dit.initialize_service(args.checkpoints, args.config, device=args.device)
    llm = None
    if args.lm:
        from acestep.llm_inference import LLMHandler

        llm = LLMHandler()
        llm.initialize(args.checkpoints, args.lm, backend="pt", device=args.device)
    bars = {}

    def progress(fraction: float, desc: str = "") -> None:
        # one bar for the LM (its descriptions start with "LM"), one for the diffusion
        name = "LM" if desc.startswith("LM") else "diffusion"
        bar = bars.get(name) or bars.setdefault(name, tqdm(total=100, desc=name, unit="%"))
        bar.set_description(desc or name)
        bar.update(int(fraction * 100) - bar.n)

    result = generate_music(dit, llm, params, config, save_dir=args.out, progress=progress)
    for bar in bars.values():
        bar.close()
    if not result.success:
        print(f"error: {result.error}", file=sys.stderr)
        return 2
    for audio in result.audios:
        print(f"{audio['path']}\tseed={audio['params']['seed']}\tkey={audio['key']}")
    return 0


def _add_lora(sub) -> None:
    p = sub.add_parser("lora", help="adapter tools")
    lora = p.add_subparsers(dest="lora_command", required=True)
    q = lora.add_parser("inspect", help="an adapter's format, rank and targets, and whether it maps onto a DiT")
    q.add_argument("path", help="a PEFT adapter folder or a diffusers .safetensors file")
    q.add_argument("--config", default="acestep-v15-turbo",
                   help="the DiT to check against: a packaged real config (built on the meta device), "
                        "or a folder name under --checkpoints")
    q.add_argument("--checkpoints", default=None, help="checkpoints root holding --config (official layout)")


def run_lora_inspect(args) -> int:
    """Print what the adapter is; exit 1 when a target module does not map onto the DiT."""
    from pathlib import Path

    from acestep.checkpoints.demo import real_config
    from acestep.checkpoints.loader import build_dit_modules
    from acestep.dit.adapters import AdapterError, check_fit, read_adapter

    try:
        adapter = read_adapter(args.path)
    except AdapterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = (json.loads((Path(args.checkpoints) / args.config / "config.json").read_text())
              if args.checkpoints else real_config(args.config))
    info = check_fit(adapter, build_dit_modules(config, device="meta")["transformer"])
    print(f"name: {info.name}\nformat: {info.format} ({info.kind})\nrank: {info.rank}  alpha: {info.alpha:g}\n"
          f"tensors: {info.tensors}  size: {info.size_bytes} bytes\ntargets: {len(info.target_modules)} modules")
    for target in info.target_modules:
        print(f"  {target}")
    mapped = len(info.target_modules) - len(info.unmapped)
    print(f"maps onto {args.config}: {mapped}/{len(info.target_modules)} target modules")
    for target in info.unmapped:
        print(f"  not mapped: {target}")
    return 1 if info.unmapped else 0


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="offline batch rendering with Ray Data (other options: "
                                      "`python -m pipelines.render --help`)")
    p.add_argument("--input", required=True, help="prompts.jsonl or prompts.parquet")
    p.add_argument("--output", required=True, help="output folder (audio files + manifest)")


def _add_train_lora(sub) -> None:
    p = sub.add_parser("train-lora", help="LoRA / LoKr training on Ray Train (other options: "
                                          "`python -m pipelines.train_lora --help`)")
    p.add_argument("--data", required=True, help="a prepared folder (python -m pipelines.prepare_dataset)")
    p.add_argument("--out", required=True, help="run folder (adapter/ in the official PEFT layout, train_log.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acestep", description="ACE-Step 1.5 music generation and serving")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo-checkpoints", help="write a tiny checkpoint set in the official layout")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=None, help="DiT folders to write, comma-separated, of turbo, base, sft, "
                                                    "xl-turbo, xl-sft, xl-base (default: turbo,base)")
    p.add_argument("--lora", metavar="DIR", default=None,
                   help="also write a tiny random LoRA for the demo turbo DiT (official PEFT layout) to DIR")
    _add_lora(sub)
    p = sub.add_parser("verify-layout", help="check a params table maps onto the modules (meta device)")
    p.add_argument("table", help="name<TAB>shape<TAB>dtype file, e.g. acestep-v15-turbo.params.tsv")
    p.add_argument("--config", default="acestep-v15-turbo", help="packaged real config to build the modules from")
    p = sub.add_parser("convert-to-diffusers", help="write an official-layout DiT as a diffusers repo")
    p.add_argument("--checkpoints", required=True)
    p.add_argument("--config", default="acestep-v15-turbo")
    p.add_argument("--out", required=True)
    _add_generate(sub)
    try:
        from acestep.lm.cli_prompt import add_prompt_parser
    except ImportError:  # the LM half is optional at import time
        add_prompt_parser = None
    if add_prompt_parser is not None:
        add_prompt_parser(sub)
    try:  # serve/cli.py defines its own options; it imports Ray only when it runs
        from serve.cli import add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    _add_render(sub)
    _add_train_lora(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("render", "train-lora"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo-checkpoints":
        from acestep.checkpoints.demo import write_demo_checkpoints

        variants = {"variants": args.variants.split(",")} if args.variants else {}
        try:
            print(write_demo_checkpoints(args.directory, seed=args.seed, **variants))
        except ValueError as error:
            parser.error(str(error))
        if args.lora:
            from acestep.checkpoints.demo_lora import write_demo_lora

            print(write_demo_lora(args.lora, seed=args.seed))
        return 0
    if args.command == "lora":
        return run_lora_inspect(args)
    if args.command == "verify-layout":
        from acestep.checkpoints.verify import run_verify_layout

        return run_verify_layout(args.table, args.config)
    if args.command == "convert-to-diffusers":
        from acestep.checkpoints.convert import convert_to_diffusers

        print(convert_to_diffusers(args.checkpoints, args.config, args.out))
        return 0
    if args.command == "generate":
        return run_generate(args)
    if args.command == "prompt":
        from acestep.lm.cli_prompt import run_prompt

        return run_prompt(args)
    if args.command == "serve":
        from serve.cli import run_serve

        return run_serve(args)
    if args.command == "render":
        from pipelines.render import main as render_main

        return render_main(["--input", args.input, "--output", args.output, *extra])
    if args.command == "train-lora":
        from pipelines.train_lora import main as train_main

        return train_main(["--data", args.data, "--out", args.out, *extra])
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
