"""CPU demo: a tiny Qwen2-shaped model learns the synthetic tool tasks by SFT, then RL improves it.

Command:  python -m tepo_jax.demo            (SFT once, then grpo, tepo_sparse and tepo_dense)
          python -m tepo_jax.train --config=configs/demo_cpu.py --config.algo.advantage=tepo_dense
Hardware: any CPU (2 cores are enough).
Runtime:  `make demo`: 9-11 minutes on 2 cores after install (SFT ~5 min, then ~1.5-2 min per RL run);
          docs/demo.md has the measured table and the design.

The tasks (tepo_jax/data/synthetic.py, docs/demo.md): products that need python, small
products the SFT demonstrator mostly does in its head (the behaviour RL has to fix), facts
that need a search, and facts stated in the question (a search is redundant). The demonstrator
double-checks 60% of its calls and searches 70% of the stated facts: calls TEPO-sparse can cut.
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
    c.data.n_train = 1024
    c.data.n_eval = 128
    c.data.prompt = "short"
    c.data.prompts_per_step = 8
    c.tools.search_top_k = 1
    c.rollout.group_size = 8
    c.rollout.max_calls = 3
    c.rollout.max_tokens = 96
    c.rollout.max_turn_tokens = 32
    c.rollout.cache_len = 512
    c.optim.lr = 3e-4
    c.train.steps = 20
    c.train.eval_every = 5
    c.train.checkpoint_every = 100
    c.sft.steps = 1000
    c.sft.batch_size = 16
    c.sft.lr = 1e-2
    c.sft.seq_len = 256
    c.sft.redundant_call_rate = 0.6
    c.sft.tool_rate.in_context = 0.7
    return c
