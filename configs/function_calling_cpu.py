"""CPU function calling: tiny random Qwen2-shaped model, SFT warm start, then RL on the
synthetic function-calling task (five fictional APIs, JSON calls in the Qwen2.5 format, several
calls per turn allowed; docs/function_calling.md).

Command:  python -m tepo_jax.train --config=configs/function_calling_cpu.py --config.algo.advantage=grpo
Hardware: any CPU (2 cores are enough).
Runtime:  about 5 min wall on 2 cores (tokenizer, 300 SFT steps, 10 RL steps, two greedy
          evaluations of 32 questions; 4 min 50 s measured on a quiet machine).
Result:   eval/accuracy=0.000 eval/f1=0.524 eval/calls_per_question=1.125 malformed=0.000
          (grpo, seed 0; F1 0.520 before RL): format and function choice are learned,
          argument values are not.
The prompt is the Qwen2.5 chat template with the five tool schemas in the system message
(~100 tokens with the function-calling tiny BPE, which merges across words).
Reward: the registry's 'function_calling' task (ToolRL: format in [0, 1] + correctness in
[-3, 3]) on the model turns joined in order; eval/accuracy = exact call match, eval/f1 = the
ToolRL match ratio S/S_max. Defaults not set here come from tepo_jax/config.py.
"""
from tepo_jax.config import defaults


def get_config():
    c = defaults()
    c.workdir = "runs/function_calling"
    c.mode = "sft_then_rl"
    c.model.tiny = True
    c.model.tiny_hidden = 128
    c.model.tiny_layers = 2
    c.model.tiny_heads = 4
    c.model.tiny_kv_heads = 2
    c.data.task = "function_calling"
    c.data.n_train = 512
    c.data.n_eval = 32
    c.data.prompts_per_step = 4
    c.tools.python = False
    c.tools.search = False
    c.rollout.group_size = 4
    c.rollout.max_calls = 2
    c.rollout.max_tokens = 128
    c.rollout.max_turn_tokens = 64
    c.rollout.cache_len = 512
    c.algo.advantage = "grpo"
    c.optim.lr = 2e-5
    c.train.steps = 10
    c.train.eval_every = 10
    c.train.checkpoint_every = 50
    c.sft.steps = 300
    c.sft.batch_size = 16
    c.sft.lr = 3e-3
    c.sft.seq_len = 512
    return c
