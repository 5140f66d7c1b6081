"""Training: GRPO of the VLM policy, online RL of the diffusion restorer, and both in turn.

`python -m realsr_r1.train` (realsr_r1/train.py) dispatches to these, one module per idea:

    data.py               HR images → degraded LQ inputs, labels and a datasets folder
    grpo.py               VLCoT-GRPO of the policy on TRL's GRPOTrainer (config → trainer)
    filtered_grpo.py      OARS group filtering on TRL's GRPOTrainer
    reflective_grpo.py    rollouts that see each stage image, as `policy.reflect` inference does
    irpo_filter.py        IRPO data filtering: the hardest inputs for the frozen policy
    group_filter.py       the group filter itself: weighted totals, thresholds on the reward's range
    restorer_rl.py        online RL of the diffusion restorer (OARS, DiffusionNFT), on accelerate
    restorer_rollouts.py  K samples of the trained stage per input, and their conditioning texts
    trainable.py          the upscaler's UNet as RL trains it: current, old (EMA), reference
    nft.py                the DiffusionNFT loss, advantages and EMA schedule
    reward_guard.py       held-out metrics outside the reward, and the guard that stops a run
    joint.py              policy and restorer trained in turn, each with the other's live weights
    common.py             what they share: config sections, warnings, how a run speaks

Rewards live in realsr_r1/rewards/: inference uses them too (the reward-guided chooser).
"""
