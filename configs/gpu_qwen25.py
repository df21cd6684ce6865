"""Qwen2.5-0.5B-Instruct or Qwen2.5-1.5B-Instruct, TEPO-sparse, on one GPU (H100/H200 80–141 GB), GSM8K math
with the python tool.

A family of two configs: `--config configs/gpu_qwen25.py:VARIANT`, VARIANT the model size, 0p5b
or 1p5b. The two differ only in the model (model.hf_checkpoint, tokenizer.path) and workdir
(runs/gpu_qwen25_VARIANT); `--config.a.b=v` overrides go on top, as for any config.

Command:  python -m tepo_jax.train --config=configs/gpu_qwen25.py:0p5b --config.model.hf_checkpoint=/path/to/Qwen2.5-0.5B-Instruct
          python -m tepo_jax.train --config=configs/gpu_qwen25.py:1p5b --config.model.hf_checkpoint=/path/to/Qwen2.5-1.5B-Instruct
GPU host: python launch/gpu.py --config configs/gpu_qwen25.py:0p5b -- --config.model.hf_checkpoint=/path/to/Qwen2.5-0.5B-Instruct
          python launch/gpu.py --config configs/gpu_qwen25.py:1p5b -- --config.model.hf_checkpoint=/path/to/Qwen2.5-1.5B-Instruct
          (all local GPUs in one process; `--mode per-gpu --num-gpus N` for one process per GPU)
Size:     tepo_jax size --config configs/gpu_qwen25.py:0p5b --model Qwen2.5-0.5B --devices 1 --device-kind h100
          tepo_jax size --config configs/gpu_qwen25.py:1p5b --model Qwen2.5-1.5B --devices 1 --device-kind h100
Hardware: 1× NVIDIA H100 80GB or H200
Runtime:  about 20–40 s per RL step (estimate, not measured); 200 steps ≈ 2 h
Files:    the /path/to/ values are placeholders: the HF checkpoint (with its tokenizer) and the
          GSM8K train/test JSONL as released ({"question", "answer": "...#### 42"}, layout gsm8k).
Memory:   rollouts up to 1536 model tokens in a 2048-token cache; 8 micro-batches of 16 rows, so
          that the estimate (about 27 GiB for 0.5B, 53 GiB for 1.5B) fits an 80 GB device.
"""
from tepo_jax.config import defaults

# variant -> HF checkpoint name
VARIANTS = {"0p5b": "Qwen2.5-0.5B-Instruct", "1p5b": "Qwen2.5-1.5B-Instruct"}


def get_config(variant: str):
    checkpoint = VARIANTS[variant]
    c = defaults()
    c.workdir = f"runs/gpu_qwen25_{variant}"
    c.mode = "rl"
    c.model.hf_checkpoint = f"/path/to/{checkpoint}"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tokenizer.path = f"/path/to/{checkpoint}"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.task = "math"
    c.data.train_path = "/path/to/gsm8k_train.jsonl"
    c.data.eval_path = "/path/to/gsm8k_test.jsonl"
    c.data.layout = "gsm8k"
    c.data.prompts_per_step = 16
    c.tools.search = False           # math: the python tool only
    c.rollout.group_size = 8
    c.rollout.max_calls = 5
    c.rollout.max_tokens = 1536
    c.rollout.max_turn_tokens = 512
    c.rollout.cache_len = 2048
    c.algo.advantage = "tepo_sparse"
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.train.steps = 200
    c.train.micro_batches = 8
    c.train.eval_every = 20
    c.train.checkpoint_every = 10
    return c
