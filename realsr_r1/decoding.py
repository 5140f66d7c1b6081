"""How the policy samples its chain of thought: one definition for inference, GRPO rollouts and the
IRPO filter.

Every field is passed to `generate` explicitly. transformers fills any field a caller leaves out
from the checkpoint's `generation_config` (`GenerationMixin._prepare_generation_config`: user kwargs >
`model.generation_config` > global defaults), and Qwen2.5-VL-Instruct ships `top_k=1` and
`repetition_penalty=1.05`: left implicit, sampling would be greedy and the penalty would land on
every repeated tag token. The defaults equal what TRL's `GRPOTrainer` samples with (`GRPOConfig`:
top_k 0, top_p 1, repetition_penalty 1, min_p None) at RealSR-R1's temperature 0.9, so a policy
runs at inference under the decoding it was trained with.

`top_k=0` and `repetition_penalty=1.0` switch those processors off (`_get_logits_processor` skips
`top_k == 0` and `repetition_penalty == 1.0`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

# Written beside a trained adapter/model: inference with `--adapter` samples as the rollouts did.
TRAINED_DECODING_FILE = "realsr_decoding.json"

# The GRPOConfig field each setting is called by in training (max_new_tokens has another name there).
GRPO_FIELDS = {"max_new_tokens": "max_completion_length", "temperature": "temperature", "top_p": "top_p",
               "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty"}


def _check_type(key: str, value) -> None:
    """The value of `key` has its field's annotated type (an int may stand for a float; a bool is no int)."""
    hint = typing.get_type_hints(Decoding)[key]
    allowed = typing.get_args(hint) or (hint,)
    allowed += (int,) if float in allowed else ()
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"generation.{key}: expected {names}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 384
    min_new_tokens: int = 0  # benchmarks force long chains with it
    do_sample: bool = True
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1: no penalty

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"generation: need 0 ≤ min_new_tokens ≤ max_new_tokens and max_new_tokens ≥ 1, "
                             f"got {self.min_new_tokens} and {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"generation.temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("generation.top_k must be ≥ 0 and generation.repetition_penalty > 0")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"generation.min_p must be in [0, 1], got {self.min_p}")

    @classmethod
    def from_config(cls, section: dict | None, base: "Decoding | None" = None) -> "Decoding":
        """A `generation:` config section (any subset of the fields) over `base` (default: the defaults)."""
        if section is not None and not isinstance(section, dict):
            raise ValueError(f"generation: expected a section (key: value lines), got {section!r}")
        section = dict(section or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in section.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=2)
                hint = f" (did you mean {' or '.join(close)}?)" if close else f" (valid: {', '.join(names)})"
                raise ValueError(f"generation.{key}: unknown decoding setting{hint}")
            _check_type(key, value)
        return dataclasses.replace(base or cls(), **section)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def generate_kwargs(self, model=None) -> dict:
        """Keyword arguments for `model.generate`: every field set, so no checkpoint default leaks in.

        Greedy decoding unsets the sampling fields (None), which transformers then leaves unused. The
        image placeholder token is suppressed, as TRL does in its rollouts: a sampled one would
        mismatch the image features."""
        kw = self.to_dict()
        if not self.do_sample:
            kw.update(temperature=None, top_p=None, top_k=None, min_p=None)
        image_token = getattr(getattr(model, "config", None), "image_token_id", None)
        if image_token is not None:
            kw["suppress_tokens"] = [int(image_token)]
        return kw

    def grpo_fields(self, vllm: bool = False) -> dict:
        """The same settings as `GRPOConfig` fields (GRPO always samples)."""
        if not self.do_sample:
            raise ValueError("generation.do_sample: false cannot be used for GRPO, which samples its groups")
        fields = {GRPO_FIELDS[k]: v for k, v in self.to_dict().items() if k in GRPO_FIELDS}
        if self.min_new_tokens:  # GRPOConfig has no field of its own: through generation_kwargs, which
            # TRL hands to transformers' generate or to vLLM's SamplingParams (there: min_tokens)
            fields["generation_kwargs"] = {"min_tokens" if vllm else "min_new_tokens": self.min_new_tokens}
        return fields
