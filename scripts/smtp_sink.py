"""An SMTP server that keeps what it receives, for the e-mail tests and the benchmark:
each message as one JSON line (envelope sender and recipients, Message-ID, Subject, the
HTML or text body) appended to the file given. Prints "ready" once it listens."""
import argparse
import json
import threading
from email import message_from_bytes, policy

from aiosmtpd.controller import Controller


class Keep:
    def __init__(self, path):
        self.out = open(path, "a", buffering=1, encoding="utf-8")
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content, policy=policy.default)
        body = msg.get_body(("html", "plain"))
        line = json.dumps({
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "message_id": msg["Message-ID"],
            "subject": str(msg["Subject"] or ""),
            "html": body.get_content() if body is not None else "",
        })
        with self.lock:
            self.out.write(line + "\n")
        return "250 OK"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    c = Controller(Keep(a.out), hostname="127.0.0.1", port=a.port)
    c.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
