"""IRPO data filtering (`python -m realsr_r1.train filter`): every training input is scored once
with the frozen policy and the configured rewards; the lowest-scoring fraction `--keep` becomes the
training set (a dataset folder beside the source, resumable: scores.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..profiles import ConfigError
from .grpo import (check_config, data_dir, decoding, load_policy_model, model_path, restorations_factory,
                   train_device)


def filter_dataset(cfg: dict, keep: float, out: Path | None = None, log=print) -> Path:
    """Score every input with the frozen policy + rewards; save the hardest `keep` fraction."""
    import numpy as np

    from ..imageio import LoadedImage, atomic_write_text
    from ..policy import VLMPolicy
    from ..rewards.registry import build_rewards
    from ..rewards.visual import as_rgb
    from .data import load_dataset

    if not 0 < keep <= 1:
        raise ConfigError(f"--keep must be in (0, 1], got {keep}")
    check_config(cfg)
    data = data_dir(cfg)
    dataset = load_dataset(data)
    out = Path(out or f"{data.as_posix().rstrip('/')}-hardest{round(100 * keep)}")
    out.mkdir(parents=True, exist_ok=True)
    device = train_device()
    funcs, weights = build_rewards(cfg.get("rewards") or {}, restorations=restorations_factory(cfg, device),
                                   device=device)
    model, processor = load_policy_model(cfg, device)
    # scored as the policy will sample in training (IRPO filters by what the rollouts would earn)
    policy = VLMPolicy(model.eval(), processor, model_path=str(model_path(cfg)), dtype=None, generation=decoding(cfg))

    scores_path = out / "scores.jsonl"
    done = {}
    if scores_path.is_file():  # resume: inputs already scored are not scored again
        for line in scores_path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            done[row["index"]] = row
    columns = [c for c in dataset.column_names if c != "prompt"]
    with open(scores_path, "a", encoding="utf-8") as f:
        for i in range(len(dataset)):
            if i in done:
                continue
            row = dataset[i]
            text = "".join(policy.stream(LoadedImage(rgb=as_rgb(row["image"])), None, seed=i))
            values = [fn(prompts=[row["prompt"]], completions=[text], **{c: [row[c]] for c in columns})[0]
                      for fn in funcs]
            total = sum(w * v for w, v in zip(weights, values) if v is not None)
            done[i] = {"index": i, "reward": total, "rewards": dict(zip([fn.__name__ for fn in funcs], values))}
            f.write(json.dumps(done[i]) + "\n")
            f.flush()
            log(f"scored {i + 1}/{len(dataset)}: reward {total:.3f}")
    n_keep = max(1, math.ceil(keep * len(dataset)))
    hardest = sorted(done.values(), key=lambda r: (r["reward"], r["index"]))[:n_keep]
    subset = dataset.select(sorted(r["index"] for r in hardest))
    subset.save_to_disk(str(out / "dataset"))
    atomic_write_text(out / "filter.json", json.dumps({"source": str(data), "keep": keep, "kept": n_keep,
                                                       "of": len(dataset), "max_reward_kept": hardest[-1]["reward"],
                                                       "mean_reward_all": float(np.mean([r["reward"] for r in done.values()]))}))
    log(f"kept the {n_keep} lowest-scoring of {len(dataset)} inputs in {out / 'dataset'}")
    return out
