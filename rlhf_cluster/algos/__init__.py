"""Pure-math layer of rlhf_cluster: masked reductions, KL estimators, advantage
estimators, PPO losses, KL controllers and pairwise preference losses (torch only)."""
