"""Text in, text out (issue 17), and `moetvm compile hf:DIR` as users run it: a tiny Mixtral (its
attention window shorter than the prompts) saved beside a BPE tokenizer trained here with
`tokenizers`, compiled with the CLI; logits and `run` against transformers (`generate` decoded by
the same tokenizer), sampling, stop strings, the chat template; `moetvm serve` with real HTTP
clients on loopback, on the host and on the emulated board."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from hf_models import tiny_model
from servers import start, stop

CLI = [sys.executable, "-m", "moetvm.cli"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPT = "def main():\n    return "
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Print the sum of a list."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer Mixtral-style model (window of 8 positions) with a 384-token byte-level BPE trained
    on the held-out text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moetvm.compiler.models import HELDOUT_TEXT

    folder = tmp_path_factory.mktemp("text") / "tiny-mixtral"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([HELDOUT_TEXT.read_text(encoding="utf-8")], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    model = tiny_model("mixtral", seed=3, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("text-art") / "art"
    done = subprocess.run([*CLI, "compile", f"hf:{model_dir}", "-o", out, "--quiet"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _their_text(reference, ids: list[int], n: int) -> str:
    model, tokenizer = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _run(artifact, *args) -> dict:
    done = subprocess.run([*CLI, "run", artifact, "--json", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_cli_compile_matches_transformers_and_ships_the_tokenizer(artifact, model_dir, reference):
    from moetvm.artifact import read_manifest
    from moetvm.runtime import load_model
    from moetvm.verify import relative_error

    manifest = read_manifest(artifact)
    assert manifest.model.source == f"hf:{model_dir}"
    tokens = np.random.default_rng().integers(0, manifest.model.vocab_size, size=(1, 12))
    with torch.no_grad():
        theirs = reference[0](torch.from_numpy(tokens)).logits.numpy()
    assert relative_error(load_model(artifact, cache_budget="30%")(tokens), theirs) < 1e-4
    info = manifest.tokenizer
    assert info.kind == "hf" and [f.path for f in info.files][0] == "tokenizer/tokenizer.json"
    assert (artifact / "tokenizer" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert info.eos_token_ids == [1] and info.special_tokens["bos_token"] == "<s>" and info.chat_template == TEMPLATE
    assert {f.path for f in info.files} <= {f.path for f in manifest.files()}  # hashed (and signed) like the rest


def test_run_prompt_prints_transformers_greedy_text(artifact, reference):
    report = _run(artifact, "--prompt", PROMPT, "--max-new-tokens", "24")
    ids = reference[1](PROMPT)["input_ids"]
    assert report["prompt_tokens"] == len(ids)
    assert report["text"] == _their_text(reference, ids, 24) and report["text"]
    # Streamed to the terminal: the prompt, then the text as it comes, then the report.
    shown = subprocess.run([*CLI, "run", artifact, "--prompt", PROMPT, "--max-new-tokens", "24"], capture_output=True,
                           text=True, timeout=600)
    assert shown.returncode == 0 and shown.stdout.startswith(PROMPT + report["text"] + "\n---")


def test_sampling_is_reproducible_and_not_greedy(artifact):
    seeded = _run(artifact, "--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos", "--temperature", "1.0",
                  "--top-p", "0.95", "--top-k", "100", "--repetition-penalty", "1.1", "--seed", "7")
    from moetvm.runtime import load_model

    model = load_model(artifact)
    options = dict(ignore_eos=True, temperature=1.0, top_p=0.95, top_k=100, repetition_penalty=1.1)
    again = model.stream(PROMPT, 24, seed=7, **options).run()
    assert again.token_ids == seeded["new_ids"] and again.text == seeded["text"]  # the CLI's, again
    assert model.generate(PROMPT, 24, seed=8, **options) != seeded["new_ids"]
    assert model.generate(PROMPT, 24, ignore_eos=True) != seeded["new_ids"]  # greedy


def test_stop_strings_stop(artifact):
    from moetvm.runtime import load_model

    model = load_model(artifact)
    greedy = model.stream(PROMPT, 24, ignore_eos=True).run()
    text = greedy.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = _run(artifact, "--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos", "--stop", stop)
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    assert len(cut["new_ids"]) < len(greedy.token_ids)
    pieces = []
    streamed = model.stream(PROMPT, 24, ignore_eos=True, stop=[stop, "never"]).run(lambda t: pieces.append(t.text))
    assert "".join(pieces) == streamed.text == cut["text"]  # nothing past the stop was ever shown


def test_chat_applies_the_template_as_transformers_does(artifact, reference):
    from moetvm.runtime import load_model

    model, tokenizer = reference
    ours = load_model(artifact).tokenizer
    assert ours.render_chat(CHAT) == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.chat_ids(CHAT) == list(ids)
    report = _run(artifact, "--chat", "--system", CHAT[0]["content"], "--prompt", CHAT[1]["content"], "--max-new-tokens", "16")
    assert report["text"] == _their_text(reference, list(ids), 16)


def test_python_api_streams_the_same_text(artifact, reference):
    from moetvm.runtime import load_model

    model = load_model(artifact)
    pieces = []
    ids = model.generate(PROMPT, 24, stream=lambda token: pieces.append(token.text), ignore_eos=True)
    assert "".join(pieces) == reference[1].decode(ids, skip_special_tokens=True)
    generation = model.stream(PROMPT, 24)
    assert [t.id for t in generation if t.id is not None] == generation.token_ids and generation.text == _their_text(reference, reference[1](PROMPT)["input_ids"], 24)


def test_trace_reads_text_with_the_artifacts_tokenizer(artifact, reference, tmp_path):
    from moetvm.runtime.trace import RoutingTrace

    (tmp_path / "in.txt").write_text(PROMPT * 4)
    done = subprocess.run([*CLI, "trace", artifact, "--text", tmp_path / "in.txt", "-o", tmp_path / "t.npz"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(RoutingTrace.load(tmp_path / "t.npz").steps) == len(reference[1](PROMPT * 4)["input_ids"])  # per BPE token


# --- the server ---------------------------------------------------------------------------
def _serve(cmd, log, timeout=300):
    proc, line = start([*cmd, "--port", "0"], "serving", log, timeout=timeout)
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


def _request(port, method, path, body=None, headers=None, timeout=600):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    return response.status, payload


def _events(payload: str) -> list:
    lines = [line[len("data: "):] for line in payload.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    proc, port = _serve([*CLI, "serve", artifact], tmp_path_factory.mktemp("serve") / "serve.log")
    yield port
    stop(proc)


def test_server_answers_as_the_cli(server, artifact):
    want = _run(artifact, "--prompt", PROMPT, "--max-new-tokens", "24")["text"]
    status, body = _request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["object"] == "text_completion" and answer["choices"][0]["text"] == want
    assert answer["usage"]["completion_tokens"] <= 24 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    status, body = _request(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                                "stream": True})
    chunks = _events(body)
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]

    chat = _run(artifact, "--chat", "--system", CHAT[0]["content"], "--prompt", CHAT[1]["content"], "--max-new-tokens", "16")
    status, body = _request(server, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 16, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["message"] == {"role": "assistant", "content": chat["text"]}
    status, body = _request(server, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 16, "temperature": 0,
                                                                     "stream": True})
    chunks = _events(body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == chat["text"]

    status, body = _request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["object"] == "model"
    assert _request(server, "GET", "/health") == (200, '{"status": "ok"}')
    status, body = _request(server, "GET", "/metrics")
    assert status == 200 and "moetvm_tokens_per_second" in body and "moetvm_expert_cache_hit_rate" in body
    assert float(next(line.split()[1] for line in body.splitlines() if line.startswith("moetvm_generated_tokens_total"))) > 0


def test_server_serves_8_concurrent_clients(server, artifact):
    from moetvm.runtime import load_model

    model = load_model(artifact)
    prompts = [f"{PROMPT}{i} + " for i in range(8)]
    want = [model.stream(p, 12).run().text for p in prompts]
    answers = [None] * 8

    def client(i):
        answers[i] = _request(server, "POST", "/v1/completions", {"prompt": prompts[i], "max_tokens": 12, "temperature": 0,
                                                                  "stream": i % 2 == 0})
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        text = "".join(c["choices"][0]["text"] for c in _events(body)) if i % 2 == 0 else json.loads(body)["choices"][0]["text"]
        assert text == want[i], i


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    ({"max_tokens": 4}, "prompt must be"),
    ({"prompt": PROMPT, "max_tokens": 10_000}, "positions"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "n": 3}, "n=3 is not supported"),
    ({"prompt": [10**9]}, "token ids must be in"),
])
def test_server_refuses_bad_requests_with_400(server, body, message):
    status, payload = _request(server, "POST", "/v1/completions", body)
    assert status == 400 and message in json.loads(payload)["error"]["message"], payload


def test_server_api_key_and_unknown_paths(artifact, tmp_path):
    proc, port = _serve([*CLI, "serve", artifact, "--api-key", "s3cret"], tmp_path / "serve.log")
    try:
        assert _request(port, "GET", "/v1/models")[0] == 401
        assert _request(port, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert _request(port, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert _request(port, "GET", "/health")[0] == 200
        assert _request(port, "GET", "/v2/nothing", headers={"Authorization": "Bearer s3cret"})[0] == 404
    finally:
        stop(proc)


def test_missing_model_directory_is_one_line(tmp_path):
    done = subprocess.run([*CLI, "compile", f"hf:{tmp_path / 'nowhere'}", "-o", tmp_path / "x"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "config.json" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_server_on_the_emulated_board(board, model_dir, artifact, tmp_path):
    """Cross-compiled for the Cortex-A72, served by the board's runtime-only install under qemu:
    the text the host's artifact gives."""
    from moetvm.runtime import load_model

    a72 = tmp_path / "a72"
    done = subprocess.run([*CLI, "compile", f"hf:{model_dir}", "--target", "cortex-a72", "-o", a72, "--quiet"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    proc, port = _serve([board, "-m", "moetvm.cli", "serve", a72], tmp_path / "board-serve.log", timeout=600)
    try:
        status, body = _request(port, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        assert json.loads(body)["choices"][0]["text"] == load_model(artifact).stream(PROMPT, 8).run().text
    finally:
        stop(proc)
