"""Ray-free torch side: policy, SAM, heads, SAE, losses, and the cores of the rollout, reference and learner roles."""
