"""Clients that GET /streamloader/stats every PERIOD seconds, each on its own keep-alive connection,
until standard input closes; then one JSON line: {"samples": [[start, latency_s], ...], "errors": [...]}.

A process of its own, so that the latencies it measures are the server's, not the test process's
threads waiting for their own interpreter lock. Usage: stats_poller.py PORT CLIENTS PERIOD
"""
import http.client
import json
import sys
import threading
import time


def poll(port: int, period: float, stop: threading.Event, samples: list, errors: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        start, t0 = time.time(), time.perf_counter()
        try:
            conn.request("GET", "/streamloader/stats")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200 or b'"models"' not in body:
                errors.append(f"{response.status}: {body[:200]!r}")
        except (OSError, http.client.HTTPException) as e:
            errors.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        samples.append((start, time.perf_counter() - t0))
        stop.wait(period)
    conn.close()


def main() -> None:
    port, clients, period = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    stop, samples, errors = threading.Event(), [], []
    threads = [threading.Thread(target=poll, args=(port, period, stop, samples, errors)) for _ in range(clients)]
    for t in threads:
        t.start()
    sys.stdin.read()  # until the test closes it
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({"samples": samples, "errors": errors}))


if __name__ == "__main__":
    main()
