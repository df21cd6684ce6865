"""Qwen2.5-7B-Instruct and Llama-3.1-8B-Instruct, each with grpo, tepo_sparse or tepo_dense, on a TPU
v5p-64 pod slice (32 chips), multi-hop QA with search + python.

A family of six configs: `--config configs/tpu_v5p.py:VARIANT`, VARIANT = MODEL_ALGO with MODEL
qwen25_7b or llama31_8b and ALGO grpo, tepo_sparse or tepo_dense. The six differ only in the
model (model.hf_checkpoint, tokenizer.path), algo.advantage and workdir; `--config.a.b=v`
overrides go on top, as for any config.

Command:  python -m tepo_jax.train --config=configs/tpu_v5p.py:qwen25_7b_grpo --config.model.hf_checkpoint=/path/to/Qwen2.5-7B-Instruct
          python -m tepo_jax.train --config=configs/tpu_v5p.py:qwen25_7b_tepo_sparse --config.model.hf_checkpoint=/path/to/Qwen2.5-7B-Instruct
          python -m tepo_jax.train --config=configs/tpu_v5p.py:qwen25_7b_tepo_dense --config.model.hf_checkpoint=/path/to/Qwen2.5-7B-Instruct
          python -m tepo_jax.train --config=configs/tpu_v5p.py:llama31_8b_grpo --config.model.hf_checkpoint=/path/to/Llama-3.1-8B-Instruct
          python -m tepo_jax.train --config=configs/tpu_v5p.py:llama31_8b_tepo_sparse --config.model.hf_checkpoint=/path/to/Llama-3.1-8B-Instruct
          python -m tepo_jax.train --config=configs/tpu_v5p.py:llama31_8b_tepo_dense --config.model.hf_checkpoint=/path/to/Llama-3.1-8B-Instruct
Pod:      python launch/tpu.py up --name NAME --zone ZONE --accelerator-type v5p-64 --config configs/tpu_v5p.py:qwen25_7b_grpo --workdir gs://BUCKET/runs/qwen25_7b_grpo
          python launch/tpu.py up --name NAME --zone ZONE --accelerator-type v5p-64 --config configs/tpu_v5p.py:qwen25_7b_tepo_sparse --workdir gs://BUCKET/runs/qwen25_7b_tepo_sparse
          python launch/tpu.py up --name NAME --zone ZONE --accelerator-type v5p-64 --config configs/tpu_v5p.py:qwen25_7b_tepo_dense --workdir gs://BUCKET/runs/qwen25_7b_tepo_dense
          python launch/tpu.py up --name NAME --zone ZONE --accelerator-type v5p-64 --config configs/tpu_v5p.py:llama31_8b_grpo --workdir gs://BUCKET/runs/llama31_8b_grpo
          python launch/tpu.py up --name NAME --zone ZONE --accelerator-type v5p-64 --config configs/tpu_v5p.py:llama31_8b_tepo_sparse --workdir gs://BUCKET/runs/llama31_8b_tepo_sparse
          python launch/tpu.py up --name NAME --zone ZONE --accelerator-type v5p-64 --config configs/tpu_v5p.py:llama31_8b_tepo_dense --workdir gs://BUCKET/runs/llama31_8b_tepo_dense
          (create, install and start on every worker; then `logs`, `stop`, `delete` with
          `--run-name tpu_v5p_VARIANT`: docs/launch.md)
Size:     tepo_jax size --config configs/tpu_v5p.py:qwen25_7b_grpo --model Qwen2.5-7B --devices 32 --device-kind tpu-v5p
          tepo_jax size --config configs/tpu_v5p.py:qwen25_7b_tepo_sparse --model Qwen2.5-7B --devices 32 --device-kind tpu-v5p
          tepo_jax size --config configs/tpu_v5p.py:qwen25_7b_tepo_dense --model Qwen2.5-7B --devices 32 --device-kind tpu-v5p
          tepo_jax size --config configs/tpu_v5p.py:llama31_8b_grpo --model Llama-3.1-8B --devices 32 --device-kind tpu-v5p
          tepo_jax size --config configs/tpu_v5p.py:llama31_8b_tepo_sparse --model Llama-3.1-8B --devices 32 --device-kind tpu-v5p
          tepo_jax size --config configs/tpu_v5p.py:llama31_8b_tepo_dense --model Llama-3.1-8B --devices 32 --device-kind tpu-v5p
Hardware: TPU v5p-64 (8 hosts × 4 chips), FSDP over all chips
Runtime:  about 1 minute per RL step; 300 steps ≈ 5–6 h (estimate, not measured)
Files:    the /path/to/ values are placeholders for files every worker can read (a shared disk or
          a copy on each): the HF checkpoint and its tokenizer, MuSiQue train/dev JSONL (or a
          tfds data dir, docs/data.md), and tools.search_corpus, the retrieval corpus: JSONL lines
          {"id", "title", "text"} (e.g. the 2018 Wikipedia passages Search-R1 uses), indexed with
          BM25 into <workdir>/search_index at the first start. Instead, tools.search_index names a
          prebuilt index, or tools.search_backend="remote" with tools.search_url a retrieval server.
Workdir:  gs://BUCKET/runs/VARIANT, given with `--workdir` (launch/tpu.py) or
          `--config.workdir` (the default, gs://BUCKET/tepo_jax/VARIANT_v5p, names no real bucket).
          The workers share no disk: checkpoints (orbax multi-host saves), metrics.jsonl,
          TensorBoard, trajectories and sft_final go to the bucket, and a restarted job resumes
          from it (docs/launch.md). A path every worker mounts (NFS/Filestore) works too.
"""
from tepo_jax.config import defaults

CHECKPOINTS = {"qwen25_7b": "Qwen2.5-7B-Instruct", "llama31_8b": "Llama-3.1-8B-Instruct"}
ALGOS = ("grpo", "tepo_sparse", "tepo_dense")
# variant -> (HF checkpoint name, algo.advantage)
VARIANTS = {f"{model}_{algo}": (checkpoint, algo) for model, checkpoint in CHECKPOINTS.items() for algo in ALGOS}


def get_config(variant: str):
    checkpoint, advantage = VARIANTS[variant]
    c = defaults()
    c.workdir = f"gs://BUCKET/tepo_jax/{variant}_v5p"   # a placeholder: --workdir gs://... (Workdir above)
    c.mode = "rl"
    c.model.hf_checkpoint = f"/path/to/{checkpoint}"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tokenizer.path = f"/path/to/{checkpoint}"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.data.task = "qa"
    c.data.train_path = "/path/to/musique_train.jsonl"
    c.data.eval_path = "/path/to/musique_dev.jsonl"
    c.data.layout = "musique"
    c.data.prompts_per_step = 64
    c.tools.search_corpus = "/path/to/wiki18_passages.jsonl"
    c.rollout.group_size = 8
    c.rollout.max_calls = 5
    c.rollout.max_tokens = 4096
    c.rollout.max_turn_tokens = 1024
    c.rollout.cache_len = 8192
    c.algo.advantage = advantage
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.train.steps = 300
    c.train.micro_batches = 8
    c.train.eval_every = 20
    c.train.checkpoint_every = 10
    return c
