"""Standalone math-verify worker: reads JSON requests on stdin, writes one JSON verdict per line on stdout.

Run as a plain script (`python _verify_worker.py`), not through multiprocessing, so it works from daemonic,
spawned or torch.distributed processes alike and never re-imports the caller's `__main__`. It runs math-verify in
its own main thread, where math-verify's signal-based timeouts work; the parent adds a hard wall-clock kill.
"""
import json
import sys
import time


def _parse(text, parse, timeout):
    # Bare LaTeX such as "\{1,2\}" or "[0,1)" only parses inside math delimiters; try both spellings.
    parsed = parse(text, parsing_timeout=timeout)
    if not parsed and "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout)
    return parsed


def main() -> None:
    from math_verify import parse, verify

    sys.stdout.write('{"ready": true}\n')
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        timeout = max(1, int(req["timeout"]))
        start = time.monotonic()
        try:
            gold = _parse(req["gold"], parse, timeout)
            pred = _parse(req["pred"], parse, timeout)
            ok = bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
            # math-verify answers False when its own signal timeout fires; report that as the timeout it is.
            reply = {"id": req["id"], "ok": ok, "timed_out": not ok and time.monotonic() - start >= 0.95 * timeout}
        except Exception as e:  # noqa: BLE001 - any failure of one comparison is reported, never fatal here
            reply = {"id": req["id"], "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
