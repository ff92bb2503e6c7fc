#!/usr/bin/env python3
"""CI check: `ferrotune serve` speaks to real clients.

Starts `ferrotune serve` on the tiny chat fixture with a key and two deployments (blue 100%,
green 0%), then:
  - the official `openai` client: chat.completions.create without and with stream=True (the
    streamed deltas must add up to the non-streamed answer, greedy), models.list, a 401 without
    the key;
  - `ferrotune invoke --sample`: the source document's sample_score.json from a random held-out
    row, sent pinned to green;
  - PUT /admin/traffic moves all traffic to green;
  - SIGTERM: the server exits 0.

    python scripts/check_serve_clients.py --ferrotune target/debug/ferrotune
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "ci-key-0123456789abcdef"
ADMIN = "ci-admin-0123456789abcdef"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferrotune", default=os.path.join(ROOT, "target/debug/ferrotune"))
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ferrotune-serve-")
    model = os.path.join(ROOT, "fixtures/models/tiny_phi3_chat")
    port_file = os.path.join(work, "port")
    server = subprocess.Popen(
        [a.ferrotune, "serve", "--deployment", f"blue={model}", "--deployment", f"green={model}",
         "--traffic", "blue=100,green=0", "--port", "0", "--port-file", port_file,
         "--api-key", KEY, "--admin-key", ADMIN, "--device", "cpu"],
        stdout=open(f"{work}/server.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not os.path.exists(port_file):
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"server did not come up:\n{open(f'{work}/server.log').read()}")
            time.sleep(0.2)
        base = f"http://127.0.0.1:{open(port_file).read().strip()}"
        assert json.load(urllib.request.urlopen(f"{base}/readyz"))["status"] == "ready"

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        full = client.chat.completions.create(model="blue", messages=messages, temperature=0, max_tokens=20)
        answer = full.choices[0].message.content
        assert full.usage.completion_tokens > 0 and full.choices[0].finish_reason in ("stop", "length"), full
        chunks = list(client.chat.completions.create(model="blue", messages=messages, temperature=0,
                                                     max_tokens=20, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer, (streamed, answer)
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
        ids = sorted(m.id for m in client.models.list())
        assert ids == ["blue", "green"], ids
        try:
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-key-0123456789").chat.completions.create(
                model="blue", messages=messages)
            sys.exit("a wrong key was accepted")
        except openai.AuthenticationError:
            pass

        # The source's sample_score.json, built from a random held-out row as the source builds it.
        sample = os.path.join(work, "sample_score.json")
        out = subprocess.run([a.ferrotune, "invoke", "--sample", "--data",
                              os.path.join(ROOT, "fixtures/ultrachat_sample/jsonl"), "--split", "test_sft",
                              "--seed", "4", "--endpoint", base, "--key", KEY, "--deployment", "green",
                              "--file", sample], check=True, capture_output=True, text=True)
        assert "served by deployment green" in out.stderr, out.stderr
        assert "output" in json.loads(out.stdout), out.stdout
        request = json.load(open(sample))
        assert request["input_data"]["parameters"] == {"temperature": 0.6, "top_p": 0.9, "do_sample": True,
                                                       "max_new_tokens": 200}, request
        assert request["params"] == {}, request

        req = urllib.request.Request(f"{base}/admin/traffic", method="PUT",
                                     data=json.dumps({"blue": 0, "green": 100}).encode(),
                                     headers={"Authorization": f"Bearer {ADMIN}",
                                              "Content-Type": "application/json"})
        assert json.load(urllib.request.urlopen(req)) == {"blue": 0, "green": 100}
        raw = client.chat.completions.with_raw_response.create(model="any", messages=messages, max_tokens=4)
        assert raw.headers["azureml-model-deployment"] == "green", raw.headers

        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        assert code == 0, f"exit code {code} after SIGTERM"
        print(f"serve check ok: openai client (plain and streaming: {len(chunks)} chunks), models, auth, "
              f"invoke with sample_score.json, traffic moved, SIGTERM exit 0")
    finally:
        if server.poll() is None:
            server.kill()


if __name__ == "__main__":
    main()
