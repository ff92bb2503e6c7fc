#!/usr/bin/env python3
"""The Python reference for `ferrotune bench serve`: transformers generation served the simple
way, one request at a time (no batching), behind the same OpenAI route and streaming format, so
the same load generator can drive both.

    python scripts/serve_reference.py --model DIR --port-file F [--port 0]

DIR is a model folder or a `ferrotune export` MLflow folder (weights in DIR/model, tokenizer in
DIR/components/tokenizer). Needs torch and transformers.
"""
import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    weights, tok_dir = a.model, a.model
    if os.path.exists(os.path.join(a.model, "MLmodel")):
        weights = os.path.join(a.model, "model")
        tok_dir = os.path.join(a.model, "components", "tokenizer")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b'{"status": "ready"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            temperature = float(req.get("temperature", 1.0))
            kwargs = dict(max_new_tokens=int(req.get("max_tokens", 256)))
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_k=0)
                torch.manual_seed(int(req.get("seed", 0)))
            else:
                kwargs.update(do_sample=False)
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            # One connection per request: a kept-alive idle connection would block this
            # single-threaded server while other clients wait in the backlog.
            self.send_header("Connection", "close")
            self.close_connection = True
            self.end_headers()

            def send(data):
                raw = f"data: {data}\n\n".encode()
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()

            with lock:  # one generation at a time: the simple way
                out = {}

                def run():
                    with torch.no_grad():
                        out["seq"] = model.generate(**ids, streamer=streamer, **kwargs)

                t = threading.Thread(target=run)
                t.start()
                for piece in streamer:
                    if piece:
                        send(json.dumps({"choices": [{"index": 0, "delta": {"content": piece},
                                                      "finish_reason": None}]}))
                t.join()
            completion = out["seq"].shape[1] - ids["input_ids"].shape[1]
            send(json.dumps({"choices": [], "usage": {"prompt_tokens": ids["input_ids"].shape[1],
                                                      "completion_tokens": completion,
                                                      "total_tokens": ids["input_ids"].shape[1] + completion}}))
            send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    class Server(HTTPServer):
        # Waiting clients queue in the listen backlog (the default of 5 refuses the rest).
        request_queue_size = 1024

    server = Server(("127.0.0.1", a.port), Handler)
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, a.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
