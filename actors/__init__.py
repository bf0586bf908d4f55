"""One Ray shell per role (rollout, reference, reward, learner) over its Ray-free core, and the supervised pools."""
