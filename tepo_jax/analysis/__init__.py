"""Analysis of agent trajectories: the pilot study (tool-call quality vs ΔH), entropy traces
and training curves. Host-side only (numpy + matplotlib); nothing here imports JAX (but
`examples`, which builds example runs with the SFT data builder and the driver's RunLog).

    from tepo_jax.analysis import pilot, plots, traces
"""
