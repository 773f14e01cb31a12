"""An HTTP/1.1 server on Python's http.server for the http probe's tests.

GET /status/<code>[/...] answers with that status code; GET /call/<port>/<path> first makes a
request to 127.0.0.1:<port>/<path> (with http.client, from the thread serving the request) and
answers 200 with what it got; anything else answers 200. Keep-alive (HTTP/1.1, Content-Length).

A request carrying `X-Call-Context: <traceparent>` makes that call carry `traceparent:
<traceparent>`, as an application instrumented with an OpenTelemetry SDK writes its own
context into the requests it makes.

Usage: python3 status_server.py PORT
"""

import http.client
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        status, body = 200, b"ok\n"
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
        elif parts[0] == "call" and len(parts) > 1:
            conn = http.client.HTTPConnection("127.0.0.1", int(parts[1]), timeout=10)
            context = self.headers.get("X-Call-Context")
            headers = {"traceparent": context} if context else {}
            conn.request("GET", "/" + "/".join(parts[2:]), headers=headers)
            response = conn.getresponse()
            body = response.read()
            conn.close()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
