"""A local OpenAI-compatible simulator stub on 127.0.0.1 (tests and the dry run):
``/v1/completions`` (a batch of prompts) and ``/v1/chat/completions`` (one
conversation), answering five documents about the query."""

import http.server
import json
import threading
import time


class StubServer:
  """A local completion server whose behaviour each test sets: 'ok', 'slow',
  'error' (HTTP 500) or 'garbage' (not JSON). Loopback only."""

  def __init__(self):
    self.mode, self.requests, self.paths = "ok", [], []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append(body)
        if outer.mode == "slow":
          time.sleep(1.0)
        if outer.mode == "error":
          self.send_response(500)
          self.end_headers()
          return
        def documents(prompt):
          return (f" Doc 1: about {prompt.split('Query: ')[1].split(chr(10))[0]}\n"
                  "Doc 2: more\nDoc 3: x\nDoc 4: y\nDoc 5: z\nDoc 6: cut")

        outer.paths.append(self.path)
        if self.path.endswith("/chat/completions"):  # one conversation a request
          answer = {"choices": [{"index": 0, "message": {
              "role": "assistant", "content": documents(body["messages"][-1]["content"])}}]}
        else:
          answer = {"choices": [{"index": i, "text": documents(p)}
                                for i, p in enumerate(body["prompt"])]}
        payload = b"not json" if outer.mode == "garbage" else json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
          self.wfile.write(payload)
        except BrokenPipeError:
          pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()
