"""VLMPolicy on a tiny random Qwen2.5-VL saved locally: loading, streaming, seeds, LoRA, 4-bit."""

import numpy as np
import pytest

from realsr_r1.cot import Plan, parse_cot
from realsr_r1.imageio import LoadedImage
from realsr_r1.policy import PolicyLoadError, VLMPolicy

from realsr_r1.tiny import build_tiny_vlm

GEN = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def policy(tiny_vlm):
    return VLMPolicy.from_pretrained(tiny_vlm, generation=GEN)


@pytest.fixture
def image():
    return LoadedImage(rgb=np.random.RandomState(0).rand(48, 64, 3).astype(np.float32))


def test_stream_yields_text_that_parses(policy, image):
    deltas = list(policy.stream(image, None, seed=0, scale=4.0))
    assert len(deltas) >= 1 and all(isinstance(d, str) for d in deltas)
    text = "".join(deltas)
    assert isinstance(text, str)
    assert "<|im_start|>" not in text and "assistant" not in text[:10]  # no prompt, no specials
    plan = parse_cot(text)
    assert isinstance(plan, Plan) and plan.problems  # random model: garbage, reported not raised


def test_processor_has_image_part(policy):
    assert getattr(policy.processor, "image_processor", None) is not None
    assert policy.processor.tokenizer is not None


def test_same_seed_same_text(policy, image):
    a = "".join(policy.stream(image, None, seed=7, scale=4.0))
    b = "".join(policy.stream(image, None, seed=7, scale=4.0))
    assert a == b


def test_describe(policy, tiny_vlm):
    d = policy.describe()
    assert d["model"] == str(tiny_vlm) and d["dtype"] == "float32"
    assert d["quantization"] is None and d["adapter"] is None


def test_missing_model_dir_is_one_line(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(PolicyLoadError) as err:
        VLMPolicy.from_pretrained(missing)
    msg = str(err.value)
    assert str(missing) in msg and "\n" not in msg


def _logits(policy, image):
    import torch

    inputs = policy._inputs(image)
    with torch.no_grad():
        return policy.model(**inputs).logits


def test_lora_adapter_loads_and_changes_output(tiny_vlm, policy, image, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    adapter_dir = tmp_path / "lora"
    peft_model.save_pretrained(adapter_dir)

    tuned = VLMPolicy.from_pretrained(tiny_vlm, adapter=adapter_dir, generation=GEN)
    assert tuned.describe()["adapter"] == str(adapter_dir)
    assert not torch.allclose(_logits(tuned, image), _logits(policy, image))
    assert "".join(tuned.stream(image, None, seed=0, scale=4.0))  # still streams


def test_missing_adapter_is_one_line(tiny_vlm, tmp_path):
    with pytest.raises(PolicyLoadError, match="adapter not found"):
        VLMPolicy.from_pretrained(tiny_vlm, adapter=tmp_path / "nope")


def test_4bit_loads_and_generates(tiny_vlm, image):
    pytest.importorskip("bitsandbytes")
    try:
        policy = VLMPolicy.from_pretrained(tiny_vlm, load_in_4bit=True, generation=GEN)
    except PolicyLoadError as e:  # pragma: no cover - depends on the bnb build
        pytest.skip(f"bitsandbytes 4-bit cannot load on this CPU: {e}")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy.model.modules())
    assert policy.describe()["quantization"] == "bnb-4bit-nf4"
    text = "".join(policy.stream(image, None, seed=0, scale=4.0))
    assert isinstance(text, str)
    parse_cot(text)


def test_tokenizer_only_processor_is_replaced(tiny_vlm, monkeypatch):
    """Where AutoProcessor silently returns just the tokenizer, an image-capable one is built."""
    import transformers

    monkeypatch.setattr(
        transformers.AutoProcessor, "from_pretrained", lambda path, **kw: transformers.AutoTokenizer.from_pretrained(path)
    )
    policy = VLMPolicy.from_pretrained(tiny_vlm, generation=GEN)
    assert policy.processor.image_processor is not None


def test_no_image_processor_is_a_clear_error(tiny_vlm, tmp_path):
    import shutil

    broken = tmp_path / "no_image_processor"
    shutil.copytree(tiny_vlm, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(PolicyLoadError, match="image processor"):
        VLMPolicy.from_pretrained(broken)


def test_stopping_early_ends_generation(policy, image):
    stream = policy.stream(image, None, seed=0, scale=4.0)
    first = next(stream)
    stream.close()  # the worker stops and the lock is released
    assert isinstance(first, str)
    assert "".join(policy.stream(image, None, seed=0, scale=4.0))


def test_token_stream_decodes_incrementally_to_the_full_text():
    """Ids fed one by one (multi-byte characters split across tokens) or in bursts give the full text."""
    import threading
    import time

    import torch

    from realsr_r1.vlm import TokenStream
    from realsr_r1.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    text = "<degradation>noise: heavy</degradation> café 🙂 naïve\nsecond line <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert "🙂" in expected and "<|im_end|>" not in expected
    stream = TokenStream(tok, timeout=5)  # everything queued before reading: one decode, one piece
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt: not part of the output
    stream.put(torch.tensor([ids]))
    stream.end()
    assert list(stream) == [expected]

    stream = TokenStream(tok, timeout=5)

    def produce():  # as generate() does: the prompt, then one token at a time
        stream.put(torch.tensor([[1, 2, 3]]))
        for i in ids:
            stream.put(torch.tensor([i]))
            time.sleep(0.002)
        stream.end()

    producer = threading.Thread(target=produce)
    producer.start()
    pieces = list(stream)
    producer.join()
    assert "".join(pieces) == expected
    assert all(p and "\ufffd" not in p for p in pieces)  # never half a character
    assert len(pieces) > 5  # streamed as it came, not one lump


# --- Real checkpoints' configs (issue 10: decoding, image budget) -----------------------------------
# What Qwen2.5-VL-3B-Instruct ships: generation_config.json and the pixel keys of preprocessor_config.json.
QWEN_GENERATION_CONFIG = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1,
                          "top_p": 0.001}
QWEN_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056,
               "size": {"shortest_edge": 3136, "longest_edge": 12845056}}


def _edit_json(path, **values):
    import json

    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def qwen_like_vlm(tmp_path_factory):
    """The tiny VLM with the real checkpoint's generation and pixel settings."""
    path = build_tiny_vlm(tmp_path_factory.mktemp("qwen_like"))
    _edit_json(path / "generation_config.json", **QWEN_GENERATION_CONFIG)
    _edit_json(path / "preprocessor_config.json", **QWEN_PIXELS)
    return path


def test_checkpoint_generation_config_does_not_make_sampling_greedy(qwen_like_vlm, image):
    """top_k=1 in the checkpoint made every seed give the same text; our settings must be the ones used."""
    policy = VLMPolicy.from_pretrained(qwen_like_vlm, generation={"max_new_tokens": 12})
    texts = {"".join(policy.stream(image, None, seed=s, scale=4.0)) for s in range(3)}
    assert len(texts) > 1
    used = policy.describe()["generation"]
    assert used["top_k"] == 0 and used["repetition_penalty"] == 1.0 and used["temperature"] == 0.9


def test_generate_receives_every_decoding_field(qwen_like_vlm, image, monkeypatch):
    from realsr_r1.decoding import Decoding

    policy = VLMPolicy.from_pretrained(qwen_like_vlm, generation={"max_new_tokens": 4, "top_p": 0.8})
    seen = {}
    real = policy.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(policy.model, "generate", spy)
    "".join(policy.stream(image, None, seed=0))
    for field, value in Decoding(max_new_tokens=4, top_p=0.8).to_dict().items():
        assert seen[field] == value, field
    assert seen["suppress_tokens"] == [policy.model.config.image_token_id]  # as TRL's rollouts


def test_greedy_decoding_is_deterministic_and_penalty_free(qwen_like_vlm, image):
    from realsr_r1.decoding import Decoding

    kw = Decoding(do_sample=False).generate_kwargs()
    assert kw["do_sample"] is False and kw["temperature"] is None and kw["top_k"] is None
    assert kw["repetition_penalty"] == 1.0
    policy = VLMPolicy.from_pretrained(qwen_like_vlm, generation={"max_new_tokens": 8, "do_sample": False})
    assert len({"".join(policy.stream(image, None, seed=s)) for s in range(2)}) == 1


def test_bad_decoding_key_is_one_line():
    from realsr_r1.decoding import Decoding

    with pytest.raises(ValueError, match=r"generation\.temprature: unknown decoding setting \(did you mean temperature"):
        Decoding.from_config({"temprature": 0.5})


def test_image_budget_through_size_without_deprecation(qwen_like_vlm, image):
    """max_pixels reaches the processor's `size`; no FutureWarning, and the grid fits the budget even
    though the checkpoint says 12.8 MP."""
    import warnings

    from PIL import Image

    policy = VLMPolicy.from_pretrained(qwen_like_vlm, max_pixels=28 * 28 * 16)
    ip = policy.processor.image_processor
    assert ip.size["longest_edge"] == 28 * 28 * 16 and ip.size["shortest_edge"] <= 28 * 28 * 16
    big = Image.new("RGB", (1024, 1024))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = ip(images=[big], return_tensors="pt")
        policy._inputs(LoadedImage(rgb=np.zeros((1024, 1024, 3), np.float32)))
    t, h, w = out["image_grid_thw"][0].tolist()
    assert (h * 14) * (w * 14) <= 28 * 28 * 16 and (h, w) == (8, 8)


def test_adapter_pointing_at_a_full_model_is_one_line(qwen_like_vlm):
    with pytest.raises(PolicyLoadError, match="not a LoRA adapter; it holds a full model: use --set policy.model="):
        VLMPolicy.from_pretrained(qwen_like_vlm, adapter=qwen_like_vlm)


def test_adapter_brings_its_training_decoding(tiny_vlm, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from realsr_r1.decoding import TRAINED_DECODING_FILE

    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_vlm),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / TRAINED_DECODING_FILE).write_text(json.dumps({"temperature": 0.6, "max_new_tokens": 20}))
    tuned = VLMPolicy.from_pretrained(tiny_vlm, adapter=tmp_path / "lora", generation={"max_new_tokens": 5})
    assert tuned.decoding.temperature == 0.6 and tuned.decoding.max_new_tokens == 5  # the profile's key wins


@pytest.mark.parametrize("budget", [0, -5, 100, "abc"])
def test_impossible_image_budget_is_one_line(qwen_like_vlm, budget):
    with pytest.raises(PolicyLoadError, match=r"max_pixels: expected a pixel count ≥ 784"):
        VLMPolicy.from_pretrained(qwen_like_vlm, max_pixels=budget)
