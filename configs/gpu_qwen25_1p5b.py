"""Qwen2.5-1.5B-Instruct, TEPO-sparse, on one GPU (H100/H200 80–141 GB), math with the python tool.

Command:  python -m tepo_jax.train --config=configs/gpu_qwen25_1p5b.py --config.model.hf_checkpoint=/path/to/Qwen2.5-1.5B-Instruct
          (pod: launch/tpu.py start --config=configs/gpu_qwen25_1p5b.py ..., see docs/launch.md)
Hardware: 1× NVIDIA H100 80GB or H200
Runtime:  about 20–40 s per RL step (estimate, not measured); 200 steps ≈ 2 h
"""
from tepo_jax.config import defaults


def get_config():
    c = defaults()
    c.workdir = "runs/gpu_qwen25_1p5b"
    c.mode = "rl"
    c.model.hf_checkpoint = "/path/to/Qwen2.5-1.5B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tokenizer.path = "/path/to/Qwen2.5-1.5B-Instruct"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.task = "math"
    c.data.train_path = "/path/to/gsm8k_train.jsonl"
    c.data.eval_path = "/path/to/gsm8k_test.jsonl"
    c.data.prompts_per_step = 16
    c.rollout.group_size = 8
    c.rollout.max_calls = 5
    c.rollout.max_tokens = 4096
    c.rollout.max_turn_tokens = 1024
    c.rollout.cache_len = 8192
    c.algo.advantage = "tepo_sparse"
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.train.steps = 200
    c.train.micro_batches = 4
    c.train.eval_every = 20
    c.train.checkpoint_every = 10
    return c
