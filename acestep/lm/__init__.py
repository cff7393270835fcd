"""The 5 Hz LM half: prompts, constrained decoding, paired-CFG decoding and the planner.

Layout (nano-vllm-like): ``prompts``/``parsing`` are pure text functions, ``vocab``+``fsm`` the
constraint tables and per-row state machine, ``sampling`` the logits maths, ``engine`` the
transformers tensor runner, ``backends`` the engines behind one ``generate(requests)`` call,
``planner`` the two-phase orchestration and ``api`` the seed's helper functions."""
