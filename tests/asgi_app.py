"""An ASGI app for uvicorn that logs every request it sees (JSON lines, to $APP_LOG).

Used behind the agent with uvicorn's two parsers, llhttp (``--http httptools``) and
h11, to see what a real app server took from the bytes the agent forwarded.
"""

import json
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    entry = {
        "method": scope["method"],
        "path": scope["path"],
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
        "body": body.decode("latin-1"),
    }
    with open(os.environ["APP_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")
    out = f"{scope['method']} {scope['path']} {len(body)}\n".encode()
    headers = [(b"content-length", str(len(out)).encode()), (b"x-app", b"cluster")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})
