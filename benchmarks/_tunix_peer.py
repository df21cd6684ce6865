"""The Tunix side of `benchmarks/tunix_step.py`, run in Tunix's own environment.

    PYTHONPATH=. .venv-tunix/bin/python -m benchmarks._tunix_peer --files DIR --part sampler|grpo

Tunix (google-tunix, `benchmarks/requirements-tunix.txt`) pins other transformers and
tokenizers releases than ours, so it lives in its own virtualenv (`make bench` makes it) and
this script imports nothing of ours but `benchmarks._compile` and `tepo_jax.compile_log` (jax
only), found through PYTHONPATH, so both sides time calls and count compile seconds alike.

DIR (written by tunix_step.py): the transformers Qwen2 checkpoint and tokenizer, and
prompts.json (the chat-rendered prompt texts our side samples from, and the answers).
Each part runs in a fresh process (its first call is a cold start; no persistent cache):
  sampler: `tunix.generate.sampler.Sampler`, the prompts x G rows, `new_tokens` tokens at
           temperature 1 (no top-k/top-p): the first call, then warm calls.
  grpo:    `tunix.rl.grpo.grpo_learner.GRPOLearner` over `tunix.rl.rl_cluster.RLCluster`
           (the vanilla rollout, actor / rollout / reference on one 1x1 CPU mesh), G
           generations, beta with the k3 ("low_var_kl") estimator, AdamW (weight decay 0.01,
           clipping 1.0, as ours), one update per batch, `steps` global steps.
The last stdout line is `RESULT {json}`; the lines before it are for people.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", required=True, help="checkpoint + tokenizer + prompts.json")
    ap.add_argument("--part", choices=("sampler", "grpo"), required=True)
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps; the first is the cold one")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache-len", type=int, default=256, help="KV cache positions (ours: rollout.cache_len)")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--sampler-calls", type=int, default=3, help="warm sampler calls")
    return ap.parse_args(argv)


def setup(files: str):
    """(jax, mesh, Tunix model config, tokenizer, prompt rows), the persistent cache off."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    from transformers import AutoTokenizer
    from tunix.models.qwen2 import model as qwen2_model

    jax.config.update("jax_enable_compilation_cache", False)
    with open(os.path.join(files, "config.json")) as f:
        hf = json.load(f)
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 1e6)
    cfg = qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope), norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=bool(hf.get("tie_word_embeddings", False)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    with open(os.path.join(files, "prompts.json")) as f:
        rows = json.load(f)
    return jax, mesh, cfg, AutoTokenizer.from_pretrained(files), rows


def load_model(files: str, cfg, mesh):
    """Tunix's own safetensors loader: the same weights as ours."""
    from tunix.models.qwen2 import params as qwen2_params
    return qwen2_params.create_model_from_safe_tensors(files, cfg, mesh)


def run_sampler(args) -> dict:
    _, mesh, cfg, tok, rows = setup(args.files)
    from benchmarks._compile import time_sampler_calls
    from tunix.generate import sampler as sampler_lib

    sampler = sampler_lib.Sampler(load_model(args.files, cfg, mesh), tok, sampler_lib.CacheConfig(
        cache_size=args.cache_len, num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    prompts = [r["prompt"] for r in rows for _ in range(args.group)]
    prompt_len = max(len(tok.encode(p)) for p in prompts)

    def call(seed: int) -> int:
        with mesh:
            out = sampler(prompts, max_generation_steps=args.new_tokens, max_prompt_length=prompt_len,
                          temperature=1.0, top_p=1.0, top_k=None, seed=seed, echo=False)
        return sum(len(t) for t in out.tokens)   # host lists: the call has finished

    return time_sampler_calls("tunix", call, args.sampler_calls)


def run_grpo(args) -> dict:
    jax, mesh, cfg, tok, rows = setup(args.files)
    import numpy as np
    import optax
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tepo_jax.compile_log import CompileLog

    prompt_len = max(len(tok.encode(r["prompt"])) for r in rows)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.01))
    cluster = rl_cluster_lib.RLCluster(
        actor=load_model(args.files, cfg, mesh), reference=load_model(args.files, cfg, mesh), tokenizer=tok,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={role: mesh for role in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                                                  rl_cluster_lib.Role.ROLLOUT)},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rl_cluster_lib.RLTrainingConfig(
                actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=args.steps,
                mini_batch_size=len(rows), train_micro_batch_size=len(rows)),
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=args.new_tokens, max_prompt_length=prompt_len,
                kv_cache_size=args.cache_len, temperature=1.0, top_p=1.0, top_k=None)))
    clock = collections.Counter()

    def reward(prompts, completions, **_):   # cheap: the reward is not what is compared
        t0 = time.perf_counter()
        out = [float(len(c) % 3) for c in completions]
        clock["reward"] += time.perf_counter() - t0
        return out

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=reward,
        algo_config=grpo_learner.GRPOConfig(num_generations=args.group, num_iterations=1, beta=args.beta,
                                            kl_loss_mode="low_var_kl", epsilon=0.2))

    # Phase clocks around the cluster's methods and the learner's global step (timing only).
    def timed(name, fn, block=False):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if block:
                jax.block_until_ready(out)
            clock[name] += time.perf_counter() - t0
            return out
        return wrapper

    cluster.generate = timed("rollout", cluster.generate)
    cluster.get_ref_per_token_logps = timed("reference", cluster.get_ref_per_token_logps, block=True)
    cluster.update_actor = timed("update", cluster.update_actor)
    steps, run_global_step = [], learner._run_global_step

    def timed_step(*a, **k):
        with CompileLog() as compiles:
            t0 = time.perf_counter()
            out = run_global_step(*a, **k)
            jax.block_until_ready(jax.tree.leaves(nnx.state(cluster.actor_trainer.model)))
            total = time.perf_counter() - t0
        phases = dict(clock, total=total, compile=compiles.total_s)
        clock.clear()
        steps.append(phases)
        if len(steps) == 1:
            print(f"tunix: first step compiles {compiles.summary(top=6)}")
        return out

    learner._run_global_step = timed_step

    def batches():   # numpy arrays, as a grain batch (the learner repeats every leaf G times)
        while True:
            yield {"prompts": np.array([r["prompt"] for r in rows]), "answer": np.array([r["answer"] for r in rows])}

    learner.train(batches())
    return {"steps": steps}


def main(argv=None):
    args = parse_args(argv)
    result = run_sampler(args) if args.part == "sampler" else run_grpo(args)
    import tunix  # noqa: F401  (the version, for the record)
    from importlib.metadata import version
    result["version"] = version("google-tunix")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
