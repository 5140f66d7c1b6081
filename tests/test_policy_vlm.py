"""VLMPolicy on a tiny random Qwen2.5-VL saved locally: loading, streaming, seeds, LoRA, 4-bit."""

import numpy as np
import pytest

from realsr_r1.cot import Plan, parse_cot
from realsr_r1.imageio import LoadedImage
from realsr_r1.policy import PolicyLoadError, VLMPolicy

from tiny_models import build_tiny_vlm  # tests/ is on sys.path (rootdir conftest)

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

    from realsr_r1.policy import TokenStream
    from tiny_models import build_tiny_tokenizer

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
