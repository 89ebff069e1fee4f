#!/usr/bin/env python3
"""A chat/echo business service for Tether, written from schemas/PROTOCOL.md section 11.

Serves uplinks of one app on `tether.<app>.biz.up` (queue group `tether-biz`):

- stores each message in memory, keyed by (did, msg_id), and answers
  {"status":"stored","id":...}; a repeated (did, msg_id) (state retries on timeout)
  answers "stored" again with the same id and stores nothing new;
- if the body is JSON {"to_uid": "...", "text": "..."} it pushes
  {"from_uid": ..., "text": ...} QoS1 to every device of that user and waits for the
  push reply; otherwise it echoes the body back to the sender's device, QoS1.

Prints one line per event on stdout (`ready` once subscribed). Exits cleanly on SIGTERM
or SIGINT.

    .tools/venv/bin/python examples/chat_service.py --nats nats://127.0.0.1:4222 --app demo
"""

import argparse
import asyncio
import itertools
import json
import signal
import sys

import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

QUEUE_GROUP = "tether-biz"


def log(*parts):
    print(*parts, flush=True)


class ChatService:
    def __init__(self, nc, app):
        self.nc = nc
        self.app = app
        self.stored = {}  # (did, msg_id) -> server message id
        self.next_id = itertools.count(1)

    async def on_uplink(self, msg):
        h = msg.headers or {}
        uid = h.get("Tether-Uid", "")
        did = h.get("Tether-Did", "")
        raw_id = h.get("Tether-Msg-Id", "")
        if not uid or not did or not raw_id.isdigit():
            log(f"bad-request did={did!r} msg_id={raw_id!r}")
            await self.reply(msg, {"status": "error", "code": "bad_request",
                                   "message": "missing Tether-Uid, Tether-Did or Tether-Msg-Id"})
            return
        key = (did, int(raw_id))

        if key in self.stored:
            # A retry of a request already stored: same answer, nothing stored twice.
            log(f"duplicate did={did} msg_id={key[1]} id={self.stored[key]}")
            await self.reply(msg, {"status": "stored", "id": self.stored[key]})
            return

        server_id = f"m{next(self.next_id)}"
        self.stored[key] = server_id
        log(f"stored uid={uid} did={did} msg_id={key[1]} id={server_id} bytes={len(msg.data)}")
        await self.reply(msg, {"status": "stored", "id": server_id})

        chat = parse_chat(msg.data)
        if chat is not None:
            to_uid, text = chat
            body = json.dumps({"from_uid": uid, "text": text}).encode()
            await self.push({"Tether-Uid": to_uid, "Tether-Qos": "1"}, body, f"uid={to_uid}")
        else:
            await self.push({"Tether-Did": did, "Tether-Qos": "1"}, msg.data, f"did={did}")

    async def reply(self, msg, answer):
        if msg.reply:
            await msg.respond(json.dumps(answer).encode())

    async def push(self, headers, body, target):
        subject = f"tether.{self.app}.push"
        try:
            resp = await self.nc.request(subject, body, timeout=5, headers=headers)
        except (NoRespondersError, NatsTimeout) as e:
            log(f"push-failed {target} error={type(e).__name__}")
            return
        try:
            answer = json.loads(resp.data)
        except ValueError:
            log(f"push-failed {target} error=bad-reply")
            return
        if "error" in answer:
            err = answer["error"]
            log(f"push-refused {target} code={err.get('code')} message={err.get('message', '')}")
            return
        accepted = ",".join(f"{a['did']}:{a.get('seq', 0)}" for a in answer.get("accepted", []))
        offline = ",".join(answer.get("offline", []))
        log(f"pushed {target} accepted={accepted} offline={offline}")


def parse_chat(data):
    """(to_uid, text) if the body is a chat message, else None."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    to_uid, text = doc.get("to_uid"), doc.get("text")
    if isinstance(to_uid, str) and to_uid and isinstance(text, str):
        return to_uid, text
    return None


async def main():
    parser = argparse.ArgumentParser(description="Tether chat/echo business service")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL")
    parser.add_argument("--app", required=True, help="app id")
    args = parser.parse_args()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    nc = await nats.connect(args.nats, name=f"chat-service-{args.app}")
    service = ChatService(nc, args.app)

    async def handle(msg):
        try:
            await service.on_uplink(msg)
        except Exception as e:  # keep serving; state retries requests left unanswered
            log(f"handler-error {type(e).__name__}: {e}")

    # Each request in its own task, so one slow push does not hold up the others.
    tasks = set()

    async def dispatch(msg):
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(f"tether.{args.app}.biz.up", queue=QUEUE_GROUP, cb=dispatch)
    await nc.flush()
    log("ready")

    await stop.wait()
    log("stopping")
    await nc.drain()  # finishes in-flight callbacks, then closes
    if tasks:
        await asyncio.wait(tasks, timeout=5)
    log("stopped")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
