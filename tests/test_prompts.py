"""FastChat conversation templates (the README's Vicuna recipe) and Mistral's sliding window.

The expected Vicuna prompt is written out here by hand from FastChat's ``vicuna_v1.1`` definition
(system line, ``USER:`` / ``ASSISTANT:`` roles, " " between turns, ``</s>`` after an answer), so
the test does not trust FastChat's own output."""
import pytest

from medusa.core.config import LlamaArgs, check_context
from medusa.core.prompts import format_prompt, stop_token_ids
from medusa.train.dataset import IGNORE_INDEX, tokenize_conversation

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
TURNS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)  # has a chat template: --conv-template must override it


def test_vicuna_template_overrides_the_models_own_chat_template(tokenizer):
    want = f"{VICUNA_SYSTEM} USER: Hi there ASSISTANT: Hello! How can I help?</s>USER: Name a colour. ASSISTANT:"
    assert format_prompt(tokenizer, TURNS, "vicuna_v1.1") == want
    assert format_prompt(tokenizer, TURNS[:1], "vicuna_v1.1") == f"{VICUNA_SYSTEM} USER: Hi there ASSISTANT:"
    assert "<|im_start|>" in format_prompt(tokenizer, TURNS)  # without it: the model's own template


def test_template_stop_ids_are_added_to_eos(tokenizer):
    assert stop_token_ids(tokenizer, "vicuna_v1.1") == (tokenizer.eos_token_id,)
    xgen = stop_token_ids(tokenizer, "xgen")  # a FastChat template with stop ids of its own
    assert xgen == (tokenizer.eos_token_id, 50256)
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        stop_token_ids(tokenizer, "vicuna")


def test_vicuna_training_labels_cover_the_answers_only(tokenizer):
    conversation = TURNS[:2] + [TURNS[2], {"role": "assistant", "content": "Blue."}]
    ex = tokenize_conversation(tokenizer, conversation, 512, "vicuna_v1.1")
    labelled = [i for i, label in zip(ex.ids, ex.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ex.ids, ex.labels))
    text = tokenizer.decode(labelled)
    # each answer plus the first token of its end-of-turn marker ("</s>" is plain text to this tokenizer)
    assert text.lstrip().startswith("Hello! How can I help?<") and " Blue.<" in text  # first tokens included
    assert "Hi there" not in text and "Name a colour" not in text and "USER" not in text
    assert len(labelled) <= len(tokenizer.encode("Hello! How can I help?")) + len(tokenizer.encode(" Blue.")) + 2


def _mistral(window):
    return LlamaArgs.from_hf_config({"model_type": "mistral", "vocab_size": 32, "hidden_size": 8,
                                     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "sliding_window": window})


def test_a_sliding_window_shorter_than_the_context_is_refused():
    check_context(_mistral(None), 32768)  # Mistral v0.2+: full attention
    check_context(_mistral(4096), 4096)
    with pytest.raises(ValueError, match="sliding window of 4096 tokens.*at most 4096, not 8192"):
        check_context(_mistral(4096), 8192)
    qwen = LlamaArgs.from_hf_config({"model_type": "qwen2", "vocab_size": 32, "hidden_size": 8,
                                     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "sliding_window": 4096, "use_sliding_window": False})
    check_context(qwen, 32768)  # Qwen2 configs carry a window they do not use


def test_backends_refuse_a_max_len_past_the_window(tmp_path, smol_dir):
    from medusa.core.backends import load_backend

    from .conftest import make_hf_model

    make_hf_model(tmp_path, "mistral", tokenizer_from=smol_dir, sliding_window=64)
    with pytest.raises(ValueError, match="sliding window of 64 tokens"):
        load_backend("torch", model=str(tmp_path), max_len=128, device="cpu")
    assert load_backend("torch", model=str(tmp_path), max_len=64, device="cpu").describe()["backend"] == "torch"
