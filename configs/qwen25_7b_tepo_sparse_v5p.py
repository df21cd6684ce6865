"""Qwen2.5-7B-Instruct with tepo_sparse on a TPU v5p-64 pod slice (32 chips), multi-hop QA with search + python.

Command:  python -m tepo_jax.train --config=configs/qwen25_7b_tepo_sparse_v5p.py --config.model.hf_checkpoint=/path/to/Qwen2.5-7B-Instruct
Pod:      python launch/tpu.py up --name NAME --zone ZONE --accelerator-type v5p-64 --config configs/qwen25_7b_tepo_sparse_v5p.py
          (create, install and start on every worker; then `logs`, `stop`, `delete`: docs/launch.md)
Size:     tepo_jax size --config configs/qwen25_7b_tepo_sparse_v5p.py --model Qwen2.5-7B --devices 32 --device-kind tpu-v5p
Hardware: TPU v5p-64 (8 hosts × 4 chips), FSDP over all chips
Runtime:  about 1 minute per RL step; 300 steps ≈ 5–6 h (estimate, not measured)
Files:    the /path/to/ values are placeholders for files every worker can read (a shared disk or
          a copy on each): the HF checkpoint and its tokenizer, MuSiQue train/dev JSONL (or a
          tfds data dir, docs/data.md), and tools.search_corpus, the retrieval corpus: JSONL lines
          {"id", "title", "text"} (e.g. the 2018 Wikipedia passages Search-R1 uses), indexed with
          BM25 into <workdir>/search_index at the first start. Instead, tools.search_index names a
          prebuilt index, or tools.search_backend="remote" with tools.search_url a retrieval server.
Workdir:  checkpoints are orbax multi-host saves, so workdir must be one directory that every
          worker sees at the same path (an NFS/Filestore or gcsfuse mount; gs:// URLs are not
          supported as workdir yet).
"""
from tepo_jax.config import defaults


def get_config():
    c = defaults()
    c.workdir = "/mnt/shared/runs/qwen25_7b_tepo_sparse_v5p"   # shared by all workers (Workdir above)
    c.mode = "rl"
    c.model.hf_checkpoint = "/path/to/Qwen2.5-7B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tokenizer.path = "/path/to/Qwen2.5-7B-Instruct"
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
    c.algo.advantage = "tepo_sparse"
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.train.steps = 300
    c.train.micro_batches = 8
    c.train.eval_every = 20
    c.train.checkpoint_every = 10
    return c
