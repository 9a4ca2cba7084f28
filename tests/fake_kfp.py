"""A fake Kubeflow Pipelines API server (v2beta1 REST, the calls ``python -m pipeline submit`` makes) on 127.0.0.1.

It keeps pipelines, versions (with the uploaded YAML), experiments and runs in memory, records
every request, and answers 401 to a request without the expected bearer token, as Kubeflow's
authenticating proxy does.
"""

import json
import threading
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlparse

from fake_http import JsonHandler


class FakeKfp:
    """The server's state; ``url`` is its address while running (a context manager)."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.pipelines: list[dict] = []
        self.versions: list[dict] = []
        self.experiments: list[dict] = []
        self.runs: list[dict] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(JsonHandler):
            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {key: values[0] for key, values in parse_qs(url.query).items()}
                fake.requests.append((method, url.path, self.headers.get("Authorization")))
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self.reply(401, {"error": "Unauthorized", "code": 16, "message": "Unauthorized"})
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, answer = fake.answer(method, url.path, query, body, self.headers)
                self.reply(status, answer)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

        return Handler

    @staticmethod
    def _named(items: list[dict], query: dict) -> list[dict]:
        predicates = json.loads(query["filter"])["predicates"] if query.get("filter") else []
        names = [p["stringValue"] for p in predicates if p["key"] in ("display_name", "name")]
        return [item for item in items if not names or item["display_name"] in names]

    @staticmethod
    def _upload(body: bytes, headers) -> str:
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
        part = next(part for part in message.iter_parts()
                    if part.get_param("name", header="content-disposition") == "uploadfile")
        return part.get_payload(decode=True).decode()

    def answer(self, method: str, path: str, query: dict, body: bytes, headers) -> tuple[int, dict]:
        """The status and JSON answer of one API call."""
        parts = path.strip("/").split("/")[2:]  # after apis/v2beta1
        if method == "GET" and parts == ["healthz"]:
            return 200, {"multi_user": True}
        if method == "GET" and parts == ["pipelines"]:
            found = [p for p in self._named(self.pipelines, query) if p["namespace"] == query.get("namespace", "")]
            return 200, {"pipelines": found, "total_size": len(found)}
        if method == "POST" and parts == ["pipelines", "upload"]:
            pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": query["name"],
                        "namespace": query.get("namespace", "")}
            self.pipelines.append(pipeline)
            # Like Kubeflow: the first upload is also the pipeline's first version, named after it.
            self.versions.append({"pipeline_id": pipeline["pipeline_id"], "pipeline_version_id": str(uuid.uuid4()),
                                  "display_name": query["name"], "yaml": self._upload(body, headers)})
            return 200, pipeline
        if method == "GET" and len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions":
            found = [{k: v for k, v in version.items() if k != "yaml"}
                     for version in self._named(self.versions, query) if version["pipeline_id"] == parts[1]]
            return 200, {"pipeline_versions": found, "total_size": len(found)}
        if method == "POST" and parts == ["pipelines", "upload_version"]:
            if any(v["display_name"] == query["name"] and v["pipeline_id"] == query["pipelineid"]
                   for v in self.versions):
                return 409, {"code": 6, "message": f"version {query['name']} already exists"}
            version = {"pipeline_id": query["pipelineid"], "pipeline_version_id": str(uuid.uuid4()),
                       "display_name": query["name"], "yaml": self._upload(body, headers)}
            self.versions.append(version)
            return 200, {k: v for k, v in version.items() if k != "yaml"}
        if method == "GET" and parts == ["experiments"]:
            found = [e for e in self._named(self.experiments, query) if e["namespace"] == query.get("namespace", "")]
            return 200, {"experiments": found, "total_size": len(found)}
        if method == "POST" and parts == ["experiments"]:
            experiment = {**json.loads(body), "experiment_id": str(uuid.uuid4())}
            experiment.setdefault("namespace", "")
            self.experiments.append(experiment)
            return 200, experiment
        if method == "POST" and parts == ["runs"]:
            run = {**json.loads(body), "run_id": str(uuid.uuid4()), "state": "PENDING"}
            self.runs.append(run)
            return 200, run
        return 404, {"code": 5, "message": f"{method} {path}: not found"}
