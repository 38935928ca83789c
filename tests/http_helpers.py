"""A local HTTP file server on 127.0.0.1 for download tests: Range requests, dropped
connections, slow links."""
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves ``files`` (path without the leading / -> bytes) on 127.0.0.1, with Range
    requests; ``drop_next`` cuts the next answer after that many body bytes."""

    def __init__(self):
        self.files = {}
        self.requests = []        # Range header of every GET (None when absent)
        self.drop_next = 0        # send this many body bytes of the next answer, then cut the connection
        self.support_range = True
        self.delay = 0.0          # seconds between 64 KiB chunks of a body (a slow link)
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                data = srv.files.get(self.path.lstrip("/"))
                rng = self.headers.get("Range")
                srv.requests.append(rng)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and srv.support_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                body = data[start:]
                if srv.drop_next:
                    n, srv.drop_next = srv.drop_next, 0
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i:i + (1 << 16)])
                    if srv.delay:
                        time.sleep(srv.delay)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
