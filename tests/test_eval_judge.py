"""The LLM judge against a real HTTP server on 127.0.0.1 that speaks OpenAI's chat-completions API."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from my_judge import judge as jd
from medusa.core.io import append_jsonl, read_jsonl
from my_judge.results import collect, format_results, pairwise_results

QUESTIONS = [{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now in French."]},
             {"question_id": 111, "category": "math", "turns": ["Area of a triangle?", "And its circle?"]}]


class FakeOpenAI:
    """POST /v1/chat/completions; ``reply(body) -> (status, content)`` decides each answer."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = outer.reply(body)
                payload = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}} \
                    if status == 200 else {"error": {"message": content, "type": "server_error"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def client(self, max_retries=0):
        return jd.JudgeClient("judge-model", self.url, api_key="test-key", max_retries=max_retries, timeout=10)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    servers = []

    def start(reply):
        servers.append(FakeOpenAI(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _user(body):
    return body["messages"][1]["content"]


def _answers(model, texts):
    """Answers whose turns read "TEXT QID.1" and "TEXT QID.2"."""
    return {q["question_id"]: {"question_id": q["question_id"], "model_id": model,
                               "choices": [{"index": 0, "turns": [f"{t} {q['question_id']}.{n}" for n in (1, 2)]}]}
            for q, t in zip(QUESTIONS, texts)}


def test_parsing():
    assert jd.parse_rating("Good. Rating: [[8]]") == 8 and jd.parse_rating("[7.5] overall") == 7.5
    assert jd.parse_rating("I refuse to rate this.") == -1 and jd.parse_rating("[[11]]") == -1
    assert [jd.parse_winner(t) for t in ("[[A]]", "so [[B]].", "[[C]]", "no verdict")] == ["A", "B", "tie", "error"]


def test_single_grading_prompts_and_scores(serve, tmp_path):
    # the judge rates turn 1 with 7, turn 2 with 4, and answers garbage for the writing question's turn 2
    def reply(body):
        text = _user(body)
        if "81.2" in text:
            return 200, "garbage without a rating"
        return 200, "Rating: [[4]]" if "### User:" in text else "Rating: [[7]]"

    server = serve(reply)
    refs = jd.load_references()
    matches = jd.make_matches(QUESTIONS, {"m-base": _answers("m-base", ["ok", "ok"])}, "single", refs)
    assert [(m.question["question_id"], m.turn) for m in matches] == [(81, 1), (81, 2), (111, 1), (111, 2)]
    out = tmp_path / "judge-model_single.jsonl"
    assert jd.run_judgments(server.client(), matches, out, parallel=2) == (4, 0)
    rows = {(r["question_id"], r["turn"]): r for r in read_jsonl(out)}
    assert {k: r["score"] for k, r in rows.items()} == {(81, 1): 7, (81, 2): -1, (111, 1): 7, (111, 2): 4}
    assert rows[(81, 1)]["judge"] == ["judge-model", "single-v1"]
    assert rows[(111, 2)]["judge"] == ["judge-model", "single-math-v1-multi-turn"]
    assert refs[111][1] in rows[(111, 2)]["user_prompt"]  # reference-guided, both reference turns shown
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer test-key"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0
    assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]
    table = collect([out])["single"]["m-base"]
    assert (table["turn_1"], table["turn_2"], table["average"], table["no_verdict"]) == (7, 4, 6, 1)


def test_retry_after_server_error(serve):
    statuses = iter([500, 200])
    server = serve(lambda body: (next(statuses), "[[9]]"))
    assert server.client(max_retries=2).complete("sys", "user") == "[[9]]"
    assert len(server.requests) == 2


def test_resume_after_failures_and_a_crash(serve, tmp_path):
    out = tmp_path / "judge-model_single.jsonl"
    matches = jd.make_matches(QUESTIONS, {"m": _answers("m", ["ok", "ok"])}, "single", jd.load_references())
    down = serve(lambda body: (503, "overloaded") if "111" in _user(body) else (200, "[[6]]"))
    assert jd.run_judgments(down.client(), matches, out) == (4, 2)  # question 111 failed, recorded with an error
    assert sum("error" in r for r in read_jsonl(out)) == 2 and collect([out])["failed"] == 2
    with out.open("a") as f:
        f.write('{"question_id": 111, "turn": 1, "mo')  # killed in the middle of a write
    up = serve(lambda body: (200, "[[8]]"))
    assert jd.run_judgments(up.client(), matches, out) == (2, 0)
    asked = " ".join(_user(r["body"]) for r in up.requests)
    assert sorted(re.findall(r"111\.\d", asked)) == ["111.1", "111.1", "111.2"]  # only question 111's turns
    result = collect([out])
    assert result["failed"] == 0 and result["single"]["m"]["turn_1"] == 7  # (6 + 8) / 2
    assert jd.run_judgments(up.client(), matches, out) == (0, 0)  # all done: nothing is asked again


def test_pairwise_both_orders_and_win_rates(serve, tmp_path):
    # the judge always prefers the answer that says "good", wherever it stands; math turn 1 is a tie
    def reply(body):
        text = _user(body)
        if "Area of a triangle?" in text and "### User:" not in text:
            return 200, "[[C]]"
        first = text.index("Assistant A") if "Assistant A" in text else 0
        a_part = text[first:text.index("Assistant B")]
        return 200, "[[A]]" if "good" in a_part else "[[B]]"

    server = serve(reply)
    answers = {"m-base": _answers("m-base", ["meh", "meh"]), "m-med": _answers("m-med", ["good", "good"])}
    matches = jd.make_matches(QUESTIONS, answers, "pairwise-baseline", jd.load_references(), baseline="m-base")
    assert {m.models for m in matches} == {("m-med", "m-base")} and len(matches) == 4
    out = tmp_path / "judge-model_pair.jsonl"
    assert jd.run_judgments(server.client(), matches, out) == (4, 0)
    assert len(server.requests) == 8  # both position orders
    rows = {(r["question_id"], r["turn"]): r for r in read_jsonl(out)}
    assert (rows[(81, 1)]["g1_winner"], rows[(81, 1)]["g2_winner"]) == ("model_1", "model_1")
    assert rows[(111, 1)]["judge"] == ["judge-model", "pair-math-v1"] and rows[(111, 1)]["g1_winner"] == "tie"
    result = collect([out], baseline="m-base")
    assert result["pairwise"] == {"m-med": {"win": 3, "loss": 0, "tie": 1, "win_rate": 0.75, "loss_rate": 0.0,
                                            "win_rate_adjusted": 0.875}}
    assert "m-med" in format_results(result)


def test_inconsistent_orders_count_as_a_tie():
    row = {"question_id": 1, "turn": 1, "model_1": "a", "model_2": "b", "g1_winner": "model_1", "g2_winner": "model_2"}
    assert pairwise_results([row])["a"] == {"win": 0, "loss": 0, "tie": 1, "win_rate": 0.0, "loss_rate": 0.0,
                                            "win_rate_adjusted": 0.5}


def test_missing_endpoint_is_a_clear_error(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(jd.JudgeConfigError, match="set OPENAI_API_KEY"):
        jd.JudgeClient("gpt-4o")
    assert jd.main(["--answer-dir", str(tmp_path)]) == 2
    assert "no judge endpoint configured" in caplog.text


def test_cli_end_to_end(serve, monkeypatch, tmp_path, capsys):
    from my_judge.results import main as results_main

    server = serve(lambda body: (200, "[[5]]"))
    for row in _answers("m-torch-medusa", ["ok", "ok"]).values():
        append_jsonl(tmp_path / "answers" / "m-torch-medusa.jsonl", row)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert jd.main(["--answer-dir", str(tmp_path / "answers"), "--questions", str(questions), "--judge-base-url",
                    server.url, "--judgment-dir", str(tmp_path / "j"), "--judge-model", "org/judge"]) == 0
    out = tmp_path / "j" / "org_judge_single.jsonl"
    assert len(read_jsonl(out)) == 4
    assert results_main([str(out), "--out", str(tmp_path / "r.json")]) == 0
    assert "m-torch-medusa" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["single"]["m-torch-medusa"]["average"] == 5
