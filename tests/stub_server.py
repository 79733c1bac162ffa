"""A local OpenAI-compatible simulator stub on 127.0.0.1 (tests and the dry run):
``/v1/completions`` (a batch of prompts) and ``/v1/chat/completions`` (one
conversation), answering five documents about the query."""

import http.server
import json
import threading
import time


class StubServer:
  """A local completion server whose behaviour each test sets: 'ok', 'slow'
  (answers after ``delay_s``), 'error' (HTTP 500), 'garbage' (not JSON) or
  'trickle' (a valid answer sent 4 bytes every ``trickle_s``). ``die_after=N``:
  the server closes after answering N requests (connections are then refused).
  ``healthy_for=N``: the first N requests are answered as 'ok' whatever the mode
  (a server that passes the health check, then fails). Loopback only."""

  def __init__(self, mode: str = "ok", delay_s: float = 1.0, trickle_s: float = 0.5,
               die_after: int | None = None, healthy_for: int = 0):
    self.mode, self.requests, self.paths = mode, [], []
    self.delay_s, self.trickle_s, self.die_after = delay_s, trickle_s, die_after
    self.healthy_for = healthy_for
    self.closed = False
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append(body)
        mode = "ok" if len(outer.requests) <= outer.healthy_for else outer.mode
        if outer.die_after is not None and len(outer.requests) > outer.die_after:
          threading.Thread(target=outer.close, daemon=True).start()
          self.close_connection = True
          return  # no answer: the server is going away
        if mode == "slow":
          time.sleep(outer.delay_s)
        if mode == "error":
          self.send_response(500)
          self.end_headers()
          return
        def documents(prompt):
          return (f" Doc 1: about {prompt.split('Query: ')[1].split(chr(10))[0]}\n"
                  "Doc 2: more\nDoc 3: x\nDoc 4: y\nDoc 5: z\nDoc 6: cut")

        outer.paths.append(self.path)
        if self.path == "/retrieve":  # Search-R1's retrieval server (retrieval_server.py)
          def hits(query):
            rows = [{"id": str(k), "contents": f'"Title {k}"\nText {k} about {query}.'}
                    for k in range(body["topk"] or 3)]
            return [{"document": r, "score": 1.0 / (k + 1)} for k, r in enumerate(rows)] \
                if body.get("return_scores") else rows
          answer = {"result": [[] if mode == "no_hits" else hits(q) for q in body["queries"]]}
        elif self.path.endswith("/chat/completions"):  # one conversation a request
          answer = {"choices": [{"index": 0, "message": {
              "role": "assistant", "content": documents(body["messages"][-1]["content"])}}]}
        else:
          answer = {"choices": [{"index": i, "text": documents(p)}
                                for i, p in enumerate(body["prompt"])]}
        if "choices" in answer:  # 200s that hold no usable completion
          choices = answer["choices"]
          if mode == "no_choices":
            answer["choices"] = []
          elif mode == "empty_text":
            for c in choices:
              c.update({"text": ""} if "text" in c else {"message": {"content": " "}})
          elif mode == "fewer":
            answer["choices"] = choices[:-1] if len(choices) > 1 else []
          elif mode == "no_index":
            for c in choices:
              c.pop("index", None)
        payload = b"not json" if mode == "garbage" else json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
          if mode == "trickle":
            for i in range(0, len(payload), 4):
              self.wfile.write(payload[i:i + 4])
              self.wfile.flush()
              time.sleep(outer.trickle_s)
          else:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
          pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    if not self.closed:
      self.closed = True
      self.httpd.shutdown()
      self.httpd.server_close()
