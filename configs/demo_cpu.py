"""CPU demo: tiny random Qwen2-shaped model, SFT warm start, then RL on the synthetic tool tasks.

Command:  python -m tepo_jax.train --config=configs/demo_cpu.py --config.algo.advantage=tepo_sparse
Hardware: any CPU (2 cores are enough).
Runtime:  `make demo` runs SFT once (243 s measured on 2 cores), then grpo, tepo_sparse and
          tepo_dense from it (about 48 s each): 6 min 30 s in all, measured on a quiet machine.
Defaults not set here come from tepo_jax/config.py (paper vs ours marked there).
"""
from tepo_jax.config import defaults


def get_config():
    c = defaults()
    c.workdir = "runs/demo"
    c.mode = "sft_then_rl"
    c.model.tiny = True
    c.model.tiny_hidden = 128
    c.model.tiny_layers = 2
    c.model.tiny_heads = 4
    c.model.tiny_kv_heads = 2
    c.data.task = "synthetic"
    c.data.n_train = 512
    c.data.n_eval = 32
    c.data.prompts_per_step = 4
    c.rollout.group_size = 4
    c.rollout.max_calls = 3
    c.rollout.max_tokens = 160
    c.rollout.max_turn_tokens = 64
    c.rollout.cache_len = 1024
    c.optim.lr = 5e-5
    c.train.steps = 12
    c.train.eval_every = 12
    c.train.checkpoint_every = 6
    c.sft.steps = 500
    c.sft.batch_size = 8
    c.sft.lr = 1e-2
    c.sft.seq_len = 1024
    return c
