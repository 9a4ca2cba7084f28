"""The base of the tests' fake API servers: a quiet HTTP request handler that answers JSON."""

import json
from http.server import BaseHTTPRequestHandler


class JsonHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing; ``reply`` answers a dict as JSON, or bytes as ``content_type``."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, body: dict | bytes, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
