"""Chat CLI: commands on a scripted backend, and every bad command through a pipe on SmolLM2.

Nothing typed may lose the conversation: each refused command or failed turn prints one bracketed
line, leaves ``Chat.messages`` as it was, and the session reads on.
"""
import io
import json
import subprocess
import sys

import pytest

from medusa.core.config import GenerationConfig
from medusa.core.engine import Step
from medusa.inference.cli import Chat

USER_HI = {"role": "user", "content": "Hi there"}


class WordTokenizer:
    """A word-level tokenizer with a growing vocabulary: just enough for encode_prompt and TextStream."""

    chat_template = "fake"
    eos_token_id = 0

    def __init__(self):
        self.words = ["<eos>"]

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return " ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:"

    def encode(self, text, add_special_tokens=False):
        for w in text.split():
            if w not in self.words:
                self.words.append(w)
        return [self.words.index(w) for w in text.split()]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return " ".join(self.words[i] for i in ids if i or not skip_special_tokens)


class ScriptedBackend:
    """Answers with the next scripted text, one word per step; an exception in the script is raised
    after the first word (an engine error in the middle of a stream).  Like the engine, a prompt
    longer than ``max_len`` is a ValueError."""

    def __init__(self, *answers, max_len=10_000):
        self.tokenizer, self.answers, self.max_len = WordTokenizer(), list(answers), max_len
        self.prompts = []

    def generate(self, ids, cfg):
        if len(ids) + 1 > self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the KV budget of {self.max_len}")
        self.prompts.append(self.tokenizer.decode(ids))
        answer = self.answers.pop(0)
        words = ["Well,", answer] if isinstance(answer, Exception) else answer.split()
        ids = self.tokenizer.encode(" ".join(map(str, words)))
        for i, tok in enumerate(ids):
            if isinstance(answer, Exception) and i == 1:
                raise answer
            yield Step((tok,), 0, "stop" if i == len(ids) - 1 else None)

    def synchronize(self):
        pass

    def describe(self):
        return {}


def make_chat(*answers, **chat_options):
    out = io.StringIO()
    backend = ScriptedBackend(*answers)
    return Chat(backend, GenerationConfig(max_new_tokens=4), None, out, **chat_options), backend, out


def new_lines(out, before):
    return out.getvalue()[before:].splitlines()


def test_regen_replaces_the_last_answer():
    chat, backend, out = make_chat("first answer", "second answer")
    chat.handle("Hi there\n")
    chat.handle("!!regen\n")
    assert chat.messages == [USER_HI, {"role": "assistant", "content": "second answer"}]
    assert "first" not in backend.prompts[1]  # the replaced answer is not in the regenerated prompt
    assert out.getvalue().count("ASSISTANT: ") == 2


def test_save_load_round_trip(tmp_path):
    chat, _, _ = make_chat("Grüße, ça va")
    chat.handle("Hi there\n")
    saved = list(chat.messages)
    path = tmp_path / "conv.json"
    chat.handle(f"!!save {path}\n")
    assert json.loads(path.read_text(encoding="utf-8")) == saved
    chat.handle("!!reset\n")
    assert chat.messages == []
    chat.handle(f"!!load {path}\n")
    assert chat.messages == saved
    chat.handle(f"!!save {path}\n")  # replacing a saved conversation is allowed
    assert json.loads(path.read_text(encoding="utf-8")) == saved
    assert not [p.name for p in tmp_path.iterdir() if p.name != "conv.json"]  # no temporary file left


BAD_FILES = {"list.json": b"[1, 2]", "object.json": b'{"a": 1}', "binary.bin": bytes(range(256)) * 4,
             "text.txt": b"hello\n", "no-content.json": b'[{"role": "user"}]',
             "bad-role.json": b'[{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]'}


def test_load_refusals_keep_the_conversation(tmp_path):
    chat, _, out = make_chat("an answer")
    chat.handle("Hi there\n")
    kept = list(chat.messages)
    for name, data in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
    commands = [f"!!load {tmp_path / name}" for name in BAD_FILES] + [f"!!load {tmp_path / 'missing.json'}",
                                                                      f"!!load {tmp_path}", "!!load"]
    for cmd in commands:
        before = len(out.getvalue())
        assert chat.handle(cmd + "\n") is True
        lines = new_lines(out, before)
        assert len(lines) == 1 and lines[0].startswith("[") and lines[0].endswith("]"), (cmd, lines)
        assert chat.messages == kept, cmd
    assert "!!load FILE" in lines[0]  # no argument: says how to use it


def test_save_failures_are_one_line_and_never_overwrite_other_files(tmp_path):
    chat, _, out = make_chat("an answer")
    chat.handle("Hi there\n")
    kept = list(chat.messages)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for cmd in (f"!!save {tmp_path / 'no' / 'such' / 'dir' / 'x.json'}", "!!save", f"!!save {notes}",
                f"!!save {tmp_path}"):
        before = len(out.getvalue())
        chat.handle(cmd + "\n")
        lines = new_lines(out, before)
        assert len(lines) == 1 and lines[0].startswith(("[not saved", "[!!save needs")), (cmd, lines)
        assert chat.messages == kept
    assert notes.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_engine_error_rolls_back_the_turn_and_the_session_goes_on():
    chat, _, out = make_chat("first answer", ValueError("the KV cache is full"), "a good answer")
    chat.handle("Hi there\n")
    kept = list(chat.messages)
    before = len(out.getvalue())
    chat.handle("Tell me more\n")  # fails after one streamed word
    assert chat.messages == kept
    lines = new_lines(out, before)
    assert lines[-1] == "[no answer: the KV cache is full; the conversation is unchanged]"
    chat.handle("Tell me more\n")
    assert chat.messages[-1] == {"role": "assistant", "content": "a good answer"} and len(chat.messages) == 4


def test_a_message_longer_than_the_engine_allows_is_refused_not_fatal():
    chat, backend, out = make_chat("an answer", "later answer")
    backend.max_len = 12
    chat.handle("Hi there\n")
    kept = list(chat.messages)
    chat.handle("word " * 50 + "\n")  # the engine's own ValueError: prompt does not fit
    assert chat.messages == kept and "does not fit the KV budget" in out.getvalue().splitlines()[-1]
    backend.max_len = 3
    chat.handle("!!regen\n")  # a failed regeneration keeps the previous answer
    assert chat.messages == kept
    backend.max_len = 12
    chat.handle("!!regen\n")
    assert chat.messages == [USER_HI, {"role": "assistant", "content": "later answer"}]


def test_prompt_plus_max_new_tokens_over_max_len_is_refused_before_generation():
    chat, backend, out = make_chat("an answer", max_len=20)
    chat.handle("word " * 20 + "\n")
    assert chat.messages == [] and backend.prompts == []
    line = out.getvalue().splitlines()[-1]
    assert "--max-new-tokens 4" in line and "--max-len 20" in line and "!!reset" in line
    chat.handle("Hi there\n")  # fits: 5 prompt words + 4 new tokens <= 20
    assert chat.messages[-1]["content"] == "an answer"


def test_unknown_command_lists_the_commands():
    chat, backend, out = make_chat()
    chat.handle("!!help\n")
    assert backend.prompts == [] and chat.messages == []
    assert out.getvalue() == ("[unknown command !!help: the commands are !!exit, !!reset, !!regen, "
                              "!!save FILE, !!load FILE]\n")


@pytest.mark.slow
def test_every_bad_command_through_a_pipe_then_an_answer(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "object.json").write_text('{"a": 1}')
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "malformed.json").write_text('[{"role": "user"}, 3]')
    bad = [f"!!save {tmp_path / 'nonexistent' / 'dir' / 'x.json'}", "!!save",
           *(f"!!load {tmp_path / n}" for n in ("list.json", "object.json", "binary.bin", "malformed.json")),
           "tell me about the sea " * 80, "!!bogus"]
    script = "\n".join(bad).encode() + b"\n!!\xff\xfe\nName a color.\n"  # + a line that is not UTF-8
    run = subprocess.run([sys.executable, "-m", "medusa.inference.cli", "--max-new-tokens", "8", "--max-len", "256"],
                         input=script, capture_output=True, timeout=600)
    stdout = run.stdout.decode()
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    lines = stdout.splitlines()
    errors = [line for line in lines if line.startswith("[") and line.endswith("]")]
    assert len(errors) == len(bad) + 1, stdout
    assert "--max-len 256" in errors[len(bad) - 2] and "unknown command" in errors[-1]
    answers = [line for line in lines if line.startswith("ASSISTANT: ")]
    assert len(answers) == 1 and answers[0].strip() != "ASSISTANT:"
    assert "Traceback" not in run.stderr.decode()
